"""Two-phase LR schedules, alone and installed by QATCallback into a Trainer run."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from transformers import TrainerCallback

from hf_qat import QATCallback
from hf_qat.schedule import ClassicSchedule, FusedSchedule, decay, make_schedule, wsd_schedule
from helpers import make_trainer


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_decay_shapes_go_from_one_to_the_minimum(shape):
    values = [decay(p / 10, shape, 0.1) for p in range(11)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert decay(0.25, "1-sqrt", 0.0) == pytest.approx(0.5)
    assert decay(0.5, "cosine", 0.0) == pytest.approx(0.5)


def test_fused_schedule_shape():
    s = FusedSchedule(total_steps=20, switch_step=15, warmup_steps=4, decay_shape="linear", min_lr_ratio=0.1)
    values = [s(i) for i in range(20)]
    assert values[:4] == [0.0, 0.25, 0.5, 0.75]
    assert values[4:16] == [1.0] * 12  # stable through the first QAT step
    assert values[19] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(values[15:], values[16:]))
    # QAT from step 0: warmup, then decay.
    s0 = FusedSchedule(total_steps=10, switch_step=0, warmup_steps=2)
    assert [s0(i) for i in range(3)] == [0.0, 0.5, 1.0] and s0(9) == pytest.approx(0.0)


def test_classic_schedule_shape():
    s = make_schedule(total_steps=40, switch_step=30, warmup_steps=5, fuse_cooldown=False, min_lr_ratio=0.0,
                      fp_cooldown_fraction=0.2, qat_warmup_fraction=0.2)
    assert isinstance(s, ClassicSchedule)
    values = [s(i) for i in range(40)]
    assert values[5:24] == [1.0] * 19
    assert values[29] == pytest.approx(0.0)  # the FP phase cools down to the minimum
    assert all(a > b for a, b in zip(values[24:30], values[25:30]))
    assert values[30] < values[31] < 1.0 and values[32] == pytest.approx(1.0)  # QAT re-warmup to the peak
    assert values[39] == pytest.approx(0.0)


def test_wsd_and_invalid_arguments():
    s = wsd_schedule(100, warmup_steps=10, cooldown_fraction=0.2)
    assert s(50) == 1.0 and s(80) == 1.0 and s(99) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="switch_step"):
        make_schedule(10, 10)
    with pytest.raises(ValueError, match="decay shape"):
        make_schedule(10, 5, decay_shape="step")


def test_schedule_state_round_trips_through_lambdalr():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(params, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, FusedSchedule(10, 5, 2))
    state = sched.state_dict()
    assert state["lr_lambdas"][0] == {"total_steps": 10, "switch_step": 5, "warmup_steps": 2,
                                      "decay_shape": "linear", "min_lr_ratio": 0.0}


class LearningRates(TrainerCallback):
    def __init__(self):
        self.lrs = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_trainer_logs_the_fused_schedule(tmp_path):
    lrs = LearningRates()
    callback = QATCallback(bits=4, group_size=16, start=0.25, fuse_cooldown=True, min_lr_ratio=0.1)
    trainer = make_trainer(tmp_path, [callback, lrs], max_steps=40, warmup_steps=4, learning_rate=1e-3)
    trainer.train()
    assert callback.switch_step == 30
    values = lrs.lrs
    assert len(values) == 40
    assert values[4:31] == [pytest.approx(1e-3)] * 27  # flat from the end of warmup through the first QAT step
    assert all(a > b for a, b in zip(values[30:], values[31:]))
    assert values[-1] == pytest.approx(1e-4)
    scale_group = trainer.optimizer.param_groups[-1]
    # the scales follow the same schedule from their own peak (scale_lr, 0.02 by default, whatever the base LR)
    assert scale_group["hf_qat_scales"] and scale_group["lr"] == pytest.approx(0.02 * values[-1] / 1e-3)
    plan = json.load(open(tmp_path / "qat_plan.json"))
    assert plan["switch_step"] == 30 and plan["strategy"] == "fixed" and plan["total_steps"] == 40


def test_trainer_logs_the_classic_schedule(tmp_path):
    lrs = LearningRates()
    callback = QATCallback(bits=4, group_size=16, start=0.25, fuse_cooldown=False, qat_warmup_fraction=0.2)
    trainer = make_trainer(tmp_path, [callback, lrs], max_steps=40, warmup_steps=4, learning_rate=1e-3)
    trainer.train()
    values = lrs.lrs
    assert values[29] == pytest.approx(0.0)  # FP cooldown ends at the minimum
    assert values[30] < values[32] and max(values[30:]) == pytest.approx(1e-3)  # QAT re-warmup, then decay
    assert values[-1] == pytest.approx(0.0)


def test_start_auto_on_a_tiny_model_runs_and_warns_about_the_range(tmp_path, caplog):
    callback = QATCallback(bits=4, group_size=16, start="auto")
    trainer = make_trainer(tmp_path, [callback], max_steps=20)
    with caplog.at_level(logging.WARNING, logger="hf_qat"):
        trainer.train()
    plan = callback.plan
    assert plan is not None and plan.strategy == "paper"
    n = sum(p.numel() for p in trainer.model.parameters()) - sum(
        m.log_scale_ratio.numel() for m in trainer.model.modules() if getattr(m, "log_scale_ratio", None) is not None)
    assert plan.num_params == n and plan.tokens_per_step == 4 * 16
    assert plan.total_tokens == 20 * 64
    assert plan.warnings and any("outside" in r.message or "below the range" in r.message for r in caplog.records)
    assert 0 <= callback.switch_step < 20
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_manage_schedule_false_keeps_the_trainers_schedule(tmp_path):
    lrs = LearningRates()
    trainer = make_trainer(tmp_path, [QATCallback(bits=4, group_size=16, start=10, manage_schedule=False), lrs],
                           max_steps=20, warmup_steps=0, lr_scheduler_type="linear", learning_rate=1e-3)
    trainer.train()
    assert lrs.lrs[10] == pytest.approx(1e-3 * 10 / 20)


def test_the_plan_counts_tokens_over_sampled_examples_not_the_first_one(tmp_path):
    """Variable-length data: the first example is 8x the others. The plan's tokens per step are the mean
    real tokens (attention mask) x examples per step, it says how it counted, and warns about the spread."""
    from transformers import Trainer

    from helpers import tiny_llama, training_args

    g = torch.Generator().manual_seed(0)
    lengths = [64] + [8] * 99
    rows = []
    for n in lengths:
        ids = torch.randint(0, 64, (16 if n == 8 else n,), generator=g)
        mask = torch.zeros_like(ids)
        mask[:n] = 1  # short examples come padded to 16: 8 real tokens
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def pad(batch):
        width = max(len(r["input_ids"]) for r in batch)
        out = {}
        for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            out[key] = torch.stack([torch.nn.functional.pad(r[key], (0, width - len(r[key])), value=fill) for r in batch])
        return out

    callback = QATCallback(bits=4, group_size=16, start="auto")
    trainer = Trainer(model=tiny_llama(), args=training_args(tmp_path, max_steps=4), train_dataset=rows,
                      data_collator=pad, callbacks=[callback])
    trainer.train()
    mean = sum(lengths) / len(lengths)
    plan = json.load(open(tmp_path / "qat_plan.json"))
    assert plan["tokens_per_step"] == round(4 * mean) != 4 * 64
    assert "100 sampled training examples" in plan["tokens_per_step_source"]
    assert any("vary in length" in w and "max 64" in w for w in plan["warnings"])
    fixed = QATCallback(bits=4, group_size=16, start="auto", sequence_length=12)
    Trainer(model=tiny_llama(), args=training_args(tmp_path / "fixed", max_steps=4), train_dataset=rows,
            data_collator=pad, callbacks=[fixed]).train()
    assert fixed.plan.tokens_per_step == 48 and fixed.plan.tokens_per_step_source == "QATConfig.sequence_length=12"
    assert not any("vary in length" in w for w in fixed.plan.warnings)
