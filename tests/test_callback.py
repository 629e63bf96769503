"""QATCallback under the Trainer: identical to FP before the switch, on the grid after, resumable."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import TrainerCallback

from hf_qat import QATCallback, QATConfig
from hf_qat.callback import SCALE_GROUP_KEY
from hf_qat.convert import qat_modules
from helpers import make_trainer, state_dict_copy

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
