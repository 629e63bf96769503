"""The trainers people run around transformers' Trainer: TRL's SFTTrainer, Liger's kernels and torch.compile.
Each either does what the plain Trainer does (QAT, the switch, resume) or is refused before the first step."""

from __future__ import annotations

import pytest
import torch

from hf_qat import QATCallback, QATConfig, QATModelError
from hf_qat.model.convert import is_qat_active, quantized_weights
from helpers import make_trainer, state_dict_copy, tiny_llama, token_dataset

CFG = dict(bits=4, group_size=16, start=4)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def switches(trainer) -> list[float]:
    return [h["qat/active"] for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------------------------------- TRL
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def sft_trainer(out, cfg: dict, max_steps: int = 8, **overrides):
    from helpers import byte_level_bpe

    rows = [{"input_ids": row["input_ids"].tolist()} for row in token_dataset(n=64)]
    kwargs = dict(max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True, report_to=[],
                  logging_steps=2, save_strategy="no", disable_tqdm=True, seed=0, weight_decay=0.1, warmup_steps=2,
                  lr_scheduler_type="linear", train_sampling_strategy="sequential",
                  dataset_kwargs={"skip_prepare_dataset": True})
    args = trl.SFTConfig(str(out), **{**kwargs, **overrides})
    return trl.SFTTrainer(model=tiny_llama(), args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=byte_level_bpe("gpt-2"), callbacks=[QATCallback(QATConfig(**cfg))])


def test_sft_trainer_switches_and_resumes_as_the_trainer_does(tmp_path):
    sft = sft_trainer(tmp_path / "sft", CFG)
    sft.train()
    plain = make_trainer(tmp_path / "plain", [QATCallback(QATConfig(**CFG))], max_steps=8, logging_steps=2)
    plain.train()
    assert switches(sft) == switches(plain) == [0.0, 0.0, 1.0, 1.0]
    assert losses(sft) == pytest.approx(losses(plain), abs=1e-3)  # TRL's tiled log-probabilities, same batches
    assert all(is_qat_active(t.model) for t in (sft, plain))

    full = sft_trainer(tmp_path / "full", CFG, save_strategy="steps", save_steps=6)
    full.train()
    resumed = sft_trainer(tmp_path / "resumed", CFG)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    expected, got = state_dict_copy(full.model), state_dict_copy(resumed.model)
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("extra, message", [
    (dict(embedding_bits=8), r"SFTTrainer.*lm_head\.weight directly.*exclude_modules"),
    (dict(distill={"teacher": "switch", "weight": 0.5}), r"SFTTrainer.*student's logits.*distill"),
])
def test_sft_trainer_refuses_what_its_fused_head_bypasses_before_the_first_step(extra, message, tmp_path):
    trainer = sft_trainer(tmp_path, {**CFG, **extra})
    with pytest.raises(QATModelError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0


def test_sft_trainer_with_the_head_left_in_float_as_advised(tmp_path):
    trainer = sft_trainer(tmp_path, {**CFG, "embedding_bits": 8, "exclude_modules": ["lm_head", "embed_tokens"]})
    trainer.train()
    assert switches(trainer)[-1] == 1.0 and "lm_head" not in dict(quantized_weights(trainer.model))


# ---------------------------------------------------------------------------------------- Liger
FLCE_ONLY = {"rope": False, "rms_norm": False, "swiglu": False}  # its other kernels patch transformers globally


def test_liger_fused_cross_entropy_trains_qat_and_refuses_a_quantized_head(tmp_path):
    pytest.importorskip("liger_kernel")
    with pytest.raises(QATModelError, match=r"Liger's fused linear cross-entropy.*fused_linear_cross_entropy"):
        make_trainer(tmp_path / "head", [QATCallback(QATConfig(**CFG, embedding_bits=8))], max_steps=8,
                     use_liger_kernel=True, liger_kernel_config=FLCE_ONLY)
    liger = make_trainer(tmp_path / "liger", [QATCallback(QATConfig(**CFG))], max_steps=8, logging_steps=2,
                         use_liger_kernel=True, liger_kernel_config=FLCE_ONLY)
    liger.train()
    plain = make_trainer(tmp_path / "plain", [QATCallback(QATConfig(**CFG))], max_steps=8, logging_steps=2)
    plain.train()
    assert liger.model.forward.__func__.__module__.startswith("liger_kernel")  # Liger computed the loss
    assert switches(liger) == switches(plain) == [0.0, 0.0, 1.0, 1.0]
    assert losses(liger) == pytest.approx(losses(plain), abs=1e-3)


# ---------------------------------------------------------------------------------------- torch.compile
def test_torch_compile_switches_and_trains_as_eager(tmp_path):
    """The Trainer's torch_compile=True (dynamo; the aot_eager backend keeps CPU tests free of a C++ build):
    the QAT units' switch recompiles the graph, and the run follows the eager one."""
    compiled = make_trainer(tmp_path / "compiled", [QATCallback(QATConfig(**CFG))], max_steps=8, logging_steps=2,
                            torch_compile=True, torch_compile_backend="aot_eager")
    compiled.train()
    eager = make_trainer(tmp_path / "eager", [QATCallback(QATConfig(**CFG))], max_steps=8, logging_steps=2)
    eager.train()
    assert switches(compiled) == switches(eager) == [0.0, 0.0, 1.0, 1.0]
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-3)
    weights = {name: qw.weight_quantizer.quantized(qw.weight.detach()) for name, qw in quantized_weights(eager.model)}
    for name, qw in quantized_weights(compiled.model):
        assert torch.allclose(qw.weight_quantizer.quantized(qw.weight.detach()), weights[name], atol=1e-2), name
