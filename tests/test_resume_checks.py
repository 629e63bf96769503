"""Resuming is checked against the run before anything loads: each mismatch is refused with the difference
named and the fix."""

from __future__ import annotations

import pytest

from hf_qat import QATCallback, QATConfig, QATConfigError, QATRuntimeError
from helpers import make_trainer

SAVED = dict(bits=4, group_size=16, start=2, manage_schedule=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A QAT run's checkpoint after the switch (step 4 of 8)."""
    out = tmp_path_factory.mktemp("qat")
    make_trainer(out, [QATCallback(QATConfig(**SAVED))], max_steps=4, save_strategy="steps", save_steps=4).train()
    return str(out / "checkpoint-4")


def resume(tmp_path, checkpoint, callbacks):
    trainer = make_trainer(tmp_path, callbacks, max_steps=8)
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


@pytest.mark.parametrize("change, named", [
    (dict(bits=2), r"QATConfig.bits=2 .*allowed: 4, as the checkpoint .* was saved with"),
    (dict(group_size=32), r"QATConfig.group_size=32 .*allowed: 16, as the checkpoint"),
])
def test_a_different_config_is_refused_naming_the_fields_and_the_fix(tmp_path, checkpoint, change, named):
    with pytest.raises(QATConfigError, match=named) as err:
        resume(tmp_path, checkpoint, [QATCallback(QATConfig(**{**SAVED, **change}))])
    message = str(err.value)
    assert f"QATCallback({checkpoint!r})" in message and "from_pretrained" in message
    assert "size mismatch" not in message


def test_every_differing_field_is_listed(tmp_path, checkpoint):
    with pytest.raises(QATConfigError, match=r"bits: 4 in the checkpoint, 2 in this run; group_size: 16 in the "
                                             r"checkpoint, 32 in this run"):
        resume(tmp_path, checkpoint, [QATCallback(QATConfig(**{**SAVED, "bits": 2, "group_size": 32}))])


def test_the_saved_config_resumes(tmp_path, checkpoint):
    trainer = resume(tmp_path, checkpoint, [QATCallback(checkpoint)])
    assert trainer.state.global_step == 8


def test_a_qat_checkpoint_resumed_without_the_callback_is_refused(tmp_path, checkpoint):
    with pytest.raises(QATRuntimeError, match=r"has no QATCallback.*callbacks=\[QATCallback\("):
        resume(tmp_path, checkpoint, [])


def test_a_checkpoint_of_a_run_without_qat_is_refused_with_the_way_to_start(tmp_path):
    make_trainer(tmp_path / "fp", [], max_steps=2, save_strategy="steps", save_steps=2).train()
    with pytest.raises(QATRuntimeError, match=r"not a checkpoint of a QAT run.*from_pretrained\(.*without "
                                              r"resume_from_checkpoint"):
        resume(tmp_path / "qat", str(tmp_path / "fp" / "checkpoint-2"), [QATCallback(QATConfig(**SAVED))])
