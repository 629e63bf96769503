"""Quantization-aware distillation through the Trainer (QATConfig(distill=...))."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import hf_qat
from hf_qat import QATCallback, QATConfig, QATConfigError, QATModelError
from hf_qat.training.distill import TEACHER_FILE, distill_kl
from helpers import make_trainer, state_dict_copy, tiny_llama

CFG = dict(bits=4, group_size=16, start=10, manage_schedule=False)


def test_distill_kl_restates_the_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, 3] = -100
    temperature = 2.0
    total, count = 0.0, 0
    for b in range(2):
        for pos in range(5):
            if labels[b, pos + 1] == -100:
                continue
            p = F.softmax(t[b, pos] / temperature, -1)
            q = F.softmax(s[b, pos] / temperature, -1)
            total += float((p * (p.log() - q.log())).sum())
            count += 1
    expected = total * temperature ** 2 / count
    assert float(distill_kl(s, t, labels, temperature)) == pytest.approx(expected, rel=1e-5)
    assert float(distill_kl(s, t, labels, temperature, num_items=4)) == pytest.approx(total * 4 / 4, rel=1e-5)
    # top-k: the teacher's 3 largest logits, renormalised; the student's full-softmax log-probs there
    p_s = F.log_softmax(s[0, 0] / 1.0, -1)
    top, index = t[0, 0].topk(3)
    p_t = F.log_softmax(top, -1)
    one = (p_t.exp() * (p_t - p_s[index])).sum()
    single = labels.new_full((1, 2), 1)
    assert float(distill_kl(s[:1, :2], t[:1, :2], single, 1.0, top_k=3)) == pytest.approx(float(one), rel=1e-5)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_weight_zero_is_plain_qat_and_distillation_changes_only_the_qat_phase(tmp_path):
    plain = make_trainer(tmp_path / "plain", [QATCallback(QATConfig(**CFG))], logging_steps=1)
    plain.train()
    zero = make_trainer(tmp_path / "zero", [QATCallback(QATConfig(**CFG, distill={"weight": 0.0}))], logging_steps=1)
    zero.train()
    assert losses(zero) == losses(plain)
    expected = state_dict_copy(plain.model)
    assert all(torch.equal(v, expected[k]) for k, v in state_dict_copy(zero.model).items())

    callback = QATCallback(QATConfig(**CFG, distill={"teacher": "switch", "weight": 0.5, "temperature": 2.0}))
    distilled = make_trainer(tmp_path / "distilled", [callback], logging_steps=1)
    distilled.train()
    assert losses(distilled)[:10] == losses(plain)[:10]  # the FP phase is untouched
    assert all(a != b for a, b in zip(losses(distilled)[10:], losses(plain)[10:]))
    history = [h for h in distilled.state.log_history if "loss" in h]
    assert not any("qat/distill_loss" in h for h in history[:10])
    assert all(h["qat/distill_loss"] > 0 and math.isfinite(h["qat/ce_loss"]) for h in history[10:])
    # the teacher is the FP model of step 10: not in the optimizer, the model's state or its children
    teacher = callback.teacher.module
    assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for g in distilled.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert not any(m is teacher for m in distilled.model.modules())
    assert len(distilled.model.state_dict()) == len(plain.model.state_dict())


@pytest.mark.parametrize("resume_step", [5, 15])
def test_resume_before_and_after_the_switch_is_exact_with_the_switch_teacher(tmp_path, resume_step):
    cfg = QATConfig(**CFG, distill={"teacher": "switch", "weight": 0.5})
    full = make_trainer(tmp_path, [QATCallback(cfg)], save_strategy="steps", save_steps=5)
    full.train()
    expected = state_dict_copy(full.model)
    checkpoint = tmp_path / f"checkpoint-{resume_step}"
    assert os.path.isfile(checkpoint / TEACHER_FILE) == (resume_step > 10)
    resumed = make_trainer(tmp_path, [QATCallback(cfg)])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = state_dict_copy(resumed.model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_initial_teacher_is_the_model_as_given_and_gradient_accumulation_runs(tmp_path):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = QATCallback(QATConfig(**CFG, distill={"teacher": "initial", "weight": 1.0, "teacher_dtype": "bfloat16"}))
    trainer = make_trainer(tmp_path, [callback], model=model, gradient_accumulation_steps=2, logging_steps=1)
    teacher = callback.teacher.module
    assert all(torch.equal(v, before[k].to(torch.bfloat16)) for k, v in teacher.state_dict().items())
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["qat/distill_loss"] > 0 for h in history[10:]) and all(math.isfinite(h["loss"]) for h in history)


def test_bad_distill_settings_are_refused_before_training(tmp_path):
    with pytest.raises(QATConfigError, match=r"distill.weight=1.5.*\[0, 1\]"):
        QATConfig(distill={"weight": 1.5})
    with pytest.raises(QATConfigError, match=r"distill.temperature=0"):
        QATConfig(distill={"temperature": 0})
    with pytest.raises(QATConfigError, match=r"distill.teacher='switch'.*no FP phase"):
        QATConfig(start=0, distill={"teacher": "switch"})
    with pytest.raises(QATConfigError, match=r"distill.alpha"):
        QATConfig(distill={"alpha": 0.5})
    other_vocab = tiny_llama(vocab=80)
    with pytest.raises(QATModelError, match="predicts 80 tokens but the student 64"):
        make_trainer(tmp_path, [QATCallback(QATConfig(**CFG, distill={"teacher": other_vocab}))])
    assert QATConfig(distill={"teacher": other_vocab}).to_dict()["distill"]["teacher"] == "nn.Module"


def test_lora_teacher_is_the_base_model_without_a_copy(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              lora_dropout=0.0))
    callback = QATCallback(QATConfig(**CFG, distill={"teacher": "switch", "weight": 0.5}))
    trainer = make_trainer(tmp_path, [callback], model=model, logging_steps=1)
    trainer.train()
    assert callback.teacher.use_peft_base and callback.teacher.module is None
    assert hf_qat.is_qat_active(model)  # the teacher pass switched QAT off and back on
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["qat/distill_loss"] > 0 for h in history[10:])


def _naive_kl(s, t, labels, temperature, top_k=None, num_items=None):
    """hf_qat 0.3's formula (every intermediate full-size): the reference the chunked loss must equal."""
    s = s[:, :-1].float() / temperature
    t = t[:, :-1].float() / temperature
    keep = labels[:, 1:] != -100
    log_p_s = F.log_softmax(s[keep], -1)
    t = t[keep]
    if top_k is not None:
        t, index = t.topk(top_k, -1)
        log_p_s = log_p_s.gather(-1, index)
    log_p_t = F.log_softmax(t, -1)
    count = keep.sum() if num_items is None else num_items
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum() * temperature ** 2 / count


@pytest.mark.parametrize("top_k", [None, 5])
def test_chunked_kl_value_and_gradient_equal_the_full_formula(monkeypatch, top_k):
    import hf_qat.training.distill as distill

    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 3 * 37)  # 3 positions a chunk: many chunks, a ragged last one
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 9, 37, generator=g), torch.randn(3, 9, 37, generator=g)
    labels = torch.randint(0, 37, (3, 9), generator=g)
    labels[1, 2:6] = -100
    for num_items in (None, 17):
        got_s, want_s = s.clone().requires_grad_(), s.clone().requires_grad_()
        got = distill.distill_kl(got_s, t, labels, 1.7, top_k, num_items)
        want = _naive_kl(want_s, t, labels, 1.7, top_k, num_items)
        (got * 3.0).backward()
        (want * 3.0).backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_s.grad, want_s.grad, rtol=1e-4, atol=1e-7)
        assert got_s.grad[:, -1].abs().sum() == 0 and got_s.grad[1, 1:5].abs().sum() == 0  # not predicted


def test_export_of_a_distilled_checkpoint_is_the_trained_student(tmp_path):
    """The teacher's file in a checkpoint folder is not the model's: its tied embedding must not win."""
    cfg = QATConfig(**{**CFG, "start": 3}, distill={"teacher": "switch", "weight": 0.5})
    trainer = make_trainer(tmp_path, [QATCallback(cfg)], max_steps=6, save_strategy="steps", save_steps=6)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-6"
    assert (checkpoint / TEACHER_FILE).is_file()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        trained = trainer.model.eval()(x).logits
        loaded = hf_qat.export.api.load_qat_checkpoint(str(checkpoint)).eval()(x).logits
        hf_qat.export_checkpoint(str(checkpoint), tmp_path / "export", format="hf-qat")
        exported = hf_qat.load_exported(tmp_path / "export").eval()(x).logits
    assert torch.equal(loaded, trained)
    torch.testing.assert_close(exported, trained, rtol=0, atol=1e-5)


def test_a_module_teacher_config_reads_back_and_asks_for_the_module(tmp_path):
    written = QATConfig(**CFG, distill={"teacher": tiny_llama(), "weight": 0.3}).to_dict()
    read = QATConfig.from_dict(written)  # a saved config of such a run: readable (exports need it)
    assert read.distill_config.teacher == "nn.Module" and read.to_dict() == written
    with pytest.raises(QATConfigError, match="pass QATCallback.*'teacher': module") as info:
        make_trainer(tmp_path, [QATCallback(read)])
    assert info.value.field == "distill.teacher"
    teacher = tiny_llama(seed=3)
    callback = QATCallback(read, distill={**written["distill"], "teacher": teacher})
    make_trainer(tmp_path, [callback])
    assert callback.teacher.module is teacher


def test_logged_terms_do_not_depend_on_gradient_accumulation(tmp_path):
    """GA=2 x 4 examples logs the qat/ce_loss and qat/distill_loss that GA=1 x 8 logs."""
    def logged(accumulation: int):
        cfg = QATConfig(**{**CFG, "start": 2}, distill={"teacher": tiny_llama(seed=5), "weight": 0.5, "temperature": 2.0})
        trainer = make_trainer(tmp_path / f"ga{accumulation}", [QATCallback(cfg)], max_steps=6, logging_steps=2,
                               per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation)
        trainer.train()
        return [(h["loss"], h["qat/ce_loss"], h["qat/distill_loss"]) for h in trainer.state.log_history
                if "qat/ce_loss" in h]

    one, two = logged(1), logged(2)
    assert len(one) == len(two) == 2
    assert all(kl > 0.01 for _, _, kl in one)  # an independent teacher: the KL term matters
    for a, b in zip(one, two):
        assert a == pytest.approx(b, rel=1e-4)
    # the terms are the loss's parts: (1 - w) * CE + w * KL is the logged loss
    for loss, ce, kl in one:
        assert 0.5 * ce + 0.5 * kl == pytest.approx(loss, rel=1e-4)


def test_distillation_with_label_smoothing_reads_the_labels_before_the_trainer_pops_them(tmp_path):
    cfg = QATConfig(**{**CFG, "start": 2}, distill={"teacher": "switch", "weight": 0.5})
    trainer = make_trainer(tmp_path, [QATCallback(cfg)], max_steps=4, logging_steps=1, label_smoothing_factor=0.1)
    trainer.train()
    history = [h for h in trainer.state.log_history if "qat/distill_loss" in h]
    assert len(history) == 2 and all(h["qat/distill_loss"] > 0 for h in history)
