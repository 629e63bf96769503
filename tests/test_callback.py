"""QATCallback under the Trainer: identical to FP before the switch, on the grid after, resumable."""

from __future__ import annotations

import logging

import json
import math
import os

import pytest
import torch
from transformers import TrainerCallback

from hf_qat import QATCallback, QATConfig, QATConfigError
from hf_qat.training.callback import SCALE_GROUP_KEY
from hf_qat.model.convert import qat_modules
from helpers import make_trainer, state_dict_copy, tiny_llama

CFG = dict(bits=4, group_size=16, start=10, manage_schedule=False)


class Snapshots(TrainerCallback):
    """Weights after given steps, and whether each active QAT layer's effective weight is on its grid."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.weights = {}
        self.on_grid = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.weights[state.global_step] = {
                k: v.detach().clone() for k, v in model.state_dict().items() if "weight_quantizer" not in k
            }
        checks = []
        for _, module in qat_modules(model):
            if module.is_qat_active:
                codes, step = module.weight_quantizer.codes(module.weight)
                per = module.weight.shape[1] // step.shape[1]
                value = codes.float() * step.repeat_interleave(per, 1).expand_as(module.weight)
                checks.append(torch.equal(module.weight_quantizer.quantized(module.weight).float(), value))
        self.on_grid[state.global_step] = checks


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_a_config_passed_as_a_callback_is_answered_with_the_callback_to_pass(tmp_path):
    with pytest.raises(AttributeError, match=r"a QATConfig was passed to the Trainer as a callback; pass "
                                             r"callbacks=\[hf_qat\.QATCallback\(config\)\]"):
        make_trainer(tmp_path, [QATConfig(bits=4, group_size=16)])
    assert not hasattr(QATConfig(), "on_train_begin") and not hasattr(QATConfig(), "anything_else")


def test_identical_to_plain_trainer_before_the_switch_and_on_grid_after(tmp_path):
    plain_snap, qat_snap = Snapshots([10]), Snapshots([10, 20])
    plain = make_trainer(tmp_path / "plain", [plain_snap], logging_steps=1)
    plain.train()
    qat = make_trainer(tmp_path / "qat", [QATCallback(QATConfig(**CFG)), qat_snap], logging_steps=1)
    qat.train()

    assert losses(qat)[:10] == losses(plain)[:10]
    for name, tensor in plain_snap.weights[10].items():
        assert torch.equal(tensor, qat_snap.weights[10][name]), name
    assert all(qat_snap.on_grid[step] == [] for step in range(1, 10))
    assert all(len(qat_snap.on_grid[step]) == 14 and all(qat_snap.on_grid[step]) for step in range(11, 21))
    assert losses(qat)[10] != losses(plain)[10]
    assert all(math.isfinite(x) for x in losses(qat))
    history = [h for h in qat.state.log_history if "loss" in h]
    assert [h["qat/active"] for h in history] == [0.0] * 10 + [1.0] * 10
    assert all(h["qat/weight_error"] > 0 for h in history[10:])


@pytest.mark.parametrize("resume_step", [5, 15])
@pytest.mark.parametrize("manage_schedule", [False, True], ids=["trainer-schedule", "fused-schedule"])
def test_resume_before_and_after_the_switch_is_exact(tmp_path, resume_step, manage_schedule):
    cfg = QATConfig(**{**CFG, "manage_schedule": manage_schedule}, embedding_bits=4)
    full = make_trainer(tmp_path, [QATCallback(cfg)], save_strategy="steps", save_steps=5)
    full.train()
    expected = state_dict_copy(full.model)
    checkpoint = tmp_path / f"checkpoint-{resume_step}"
    assert json.load(open(checkpoint / "qat_config.json"))["start"] == 10

    resumed = make_trainer(tmp_path / "resumed", [QATCallback(cfg)])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = state_dict_copy(resumed.model)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_scales_get_their_own_param_group(tmp_path):
    trainer = make_trainer(tmp_path, [QATCallback(**{**CFG, "start": 1}, scale_lr_multiplier=0.1)], max_steps=2,
                           warmup_steps=0, lr_scheduler_type="constant")
    trainer.train()
    groups = trainer.optimizer.param_groups
    scale_groups = [g for g in groups if g.get(SCALE_GROUP_KEY)]
    assert len(scale_groups) == 1
    scales = {id(m.weight_quantizer.log_scale_ratio) for _, m in qat_modules(trainer.model)}
    assert {id(p) for p in scale_groups[0]["params"]} == scales
    assert scale_groups[0]["weight_decay"] == 0.0
    assert scale_groups[0]["lr"] == pytest.approx(1e-4)
    assert all(id(p) not in scales for g in groups if not g.get(SCALE_GROUP_KEY) for p in g["params"])
    assert os.path.isfile(tmp_path / "qat_config.json")


@pytest.mark.parametrize("base_lr", [1e-3, 1e-5])
def test_the_scales_learning_rate_is_absolute_by_default_or_relative_when_asked(base_lr, tmp_path):
    rates = {}
    for name, fields in (("default", {}), ("scale_lr", {"scale_lr": 0.05}), ("multiplier", {"scale_lr_multiplier": 7.0})):
        trainer = make_trainer(tmp_path / name, [QATCallback(**{**CFG, "start": 1}, **fields)], max_steps=1,
                               warmup_steps=0, lr_scheduler_type="constant", learning_rate=base_lr)
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        rates[name] = next(g for g in trainer.optimizer.param_groups if g.get(SCALE_GROUP_KEY))["lr"]
    assert rates == {"default": pytest.approx(0.02), "scale_lr": pytest.approx(0.05),
                     "multiplier": pytest.approx(7.0 * base_lr)}
    with pytest.raises(QATConfigError, match="scale_lr=0.05 is not allowed; allowed: None when scale_lr_multiplier is set"):
        QATConfig(scale_lr=0.05, scale_lr_multiplier=7.0)


def test_optimizer_state_of_quantized_weights_is_reset_at_the_switch(tmp_path):
    trainer = make_trainer(tmp_path, [QATCallback(**{**CFG, "start": 6}, reset_optimizer_state=True)], max_steps=8)
    trainer.train()
    layer = trainer.model.model.layers[0].self_attn.q_proj
    norm = trainer.model.model.layers[0].input_layernorm.weight
    assert float(trainer.optimizer.state[layer.weight]["step"]) == 2.0
    assert float(trainer.optimizer.state[norm]["step"]) == 8.0
    assert float(trainer.optimizer.state[layer.weight_quantizer.log_scale_ratio]["step"]) == 2.0


def test_fraction_start_and_tied_embedding_qat(tmp_path):
    cfg = QATConfig(bits=4, group_size=16, embedding_bits=4, start=0.25, manage_schedule=False)
    callback = QATCallback(cfg)
    trainer = make_trainer(tmp_path, [callback], max_steps=20)
    trainer.train()
    assert callback.switch_step == 15
    model = trainer.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight_quantizer is model.model.embed_tokens.weight_quantizer
    assert model.lm_head.is_qat_active and model.model.embed_tokens.is_qat_active
    assert all(math.isfinite(x) for x in losses(trainer))


def test_weight_error_is_measured_at_the_switch_and_at_evaluation_only(tmp_path, monkeypatch):
    import hf_qat.training.callback as callback_module

    calls = []
    real = callback_module.quantization_error
    monkeypatch.setattr(callback_module, "quantization_error", lambda model: calls.append(1) or real(model))
    from transformers import Trainer

    from helpers import tiny_llama, token_dataset, training_args

    callback = QATCallback(QATConfig(**CFG))
    trainer = Trainer(model=tiny_llama(), train_dataset=token_dataset(), eval_dataset=token_dataset(n=8, seed=3),
                      args=training_args(tmp_path, logging_steps=1, eval_strategy="steps", eval_steps=15),
                      callbacks=[callback])
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and len(calls) == 1 + 2  # the switch (step 10) and each evaluation; 20 logs measured nothing
    history = [h for h in trainer.state.log_history if "loss" in h]
    errors = [h["qat/weight_error"] for h in history[10:]]
    assert errors[0] > 0 and errors[:5] == [errors[0]] * 5 and errors[5] != errors[0]  # re-measured at step 15
    assert trainer.evaluate()["eval_qat/weight_error"] == callback.weight_error == real(trainer.model)


def test_log_quant_error_false_measures_nothing(tmp_path, monkeypatch):
    import hf_qat.training.callback as callback_module

    monkeypatch.setattr(callback_module, "quantization_error", lambda model: pytest.fail("measured"))
    trainer = make_trainer(tmp_path, [QATCallback(QATConfig(**CFG, log_quant_error=False))], logging_steps=1)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert history[-1]["qat/active"] == 1.0 and not any("qat/weight_error" in h for h in history)


def test_law_strategy_and_quantized_only_count_through_the_callback(tmp_path):
    from hf_qat.planner import ILLUSTRATIVE_PARAMS, QATScalingLaw, plan_qat

    law_path = QATScalingLaw(ILLUSTRATIVE_PARAMS).save(str(tmp_path / "law.json"))
    cfg = QATConfig(bits=4, group_size=16, start="auto", strategy="law", law_path=law_path,
                    count_quantized_params_only=True, sequence_length=16)
    callback = QATCallback(cfg)
    trainer = make_trainer(tmp_path, [callback], max_steps=20)
    trainer.train()
    quantized = sum(m.weight.numel() for _, m in qat_modules(trainer.model))
    assert callback.plan.strategy == "law" and callback.plan.num_params == quantized
    assert quantized < sum(p.numel() for p in trainer.model.parameters())
    expected = plan_qat(quantized, 20 * 4 * 16, 4, total_steps=20, law=law_path, strategy="law")
    assert callback.switch_step == expected.switch_step and callback.plan.predicted_loss == expected.predicted_loss


def test_auto_start_on_a_loaded_checkpoint_without_pretrained_tokens_is_warned(tmp_path, caplog):
    """A fine-tune planned as if it were the model's whole training puts QAT on its last steps only: the plan
    says so when the model came from a checkpoint; with pretrained_tokens it runs QAT from step 0, unwarned."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "checkpoint")
    for tokens, warned in ((None, True), ("2T", False)):
        loaded = type(model).from_pretrained(tmp_path / "checkpoint")
        callback = QATCallback(QATConfig(bits=4, group_size=16, start="auto", sequence_length=16, pretrained_tokens=tokens))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_qat"):
            make_trainer(tmp_path / str(tokens), [callback], model=loaded, max_steps=20).train()
        message = [r.getMessage() for r in caplog.records if "pretrained_tokens is unset" in r.getMessage()]
        assert bool(message) == warned
        assert (callback.switch_step > 0) == warned  # the last steps only, or QAT from step 0
        if warned:
            assert str(tmp_path / "checkpoint") in message[0] and "If its weights are pretrained" in message[0]


def test_lsq_scale_gradient_mode_end_to_end(tmp_path):
    grads = {}
    for mode in ("paretoq", "lsq"):
        callback = QATCallback(QATConfig(bits=4, group_size=16, start=0, scale_grad_mode=mode, manage_schedule=False))
        trainer = make_trainer(tmp_path / mode, [callback], max_steps=1, learning_rate=0.0, warmup_steps=0,
                               lr_scheduler_type="constant")
        trainer.train()
        unit = trainer.model.model.layers[0].mlp.down_proj.weight_quantizer
        weight = trainer.model.model.layers[0].mlp.down_proj.weight
        n_per_scale = weight.shape[1] // unit.log_scale_ratio.shape[1]
        expected = (weight.numel() * 7) ** -0.5 if mode == "paretoq" else (n_per_scale * 7) ** -0.5
        assert unit.spec.grad_scale == pytest.approx(expected)
        x = torch.randint(0, 64, (2, 8))
        trainer.model.zero_grad()
        trainer.model(input_ids=x, labels=x).loss.backward()
        grads[mode] = unit.log_scale_ratio.grad.clone()
    # same weights and data (lr 0): the gradients differ by sqrt(numel / weights per scale)
    torch.testing.assert_close(grads["lsq"], grads["paretoq"] * (weight.numel() / n_per_scale) ** 0.5, rtol=1e-5, atol=0)
