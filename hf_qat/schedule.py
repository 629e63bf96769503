"""Learning-rate schedules of two-phase (FP then QAT) training, as LambdaLR multipliers.

* Fused (the paper's cooldown + QAT fusion, arXiv 2509.22935): warmup, then the stable LR until the
  switch step, then the whole decay over exactly the QAT steps: the first QAT step runs at the stable
  LR, the last one at ``min_lr_ratio``.
* Classic: the FP phase is warmup -> stable -> its own cooldown (the last ``fp_cooldown_fraction``
  of the FP steps decay to the minimum); the QAT phase restarts with a short warmup back to the peak
  and decays to the minimum by the last step.

Decay shapes: "linear", "cosine", "1-sqrt". The multipliers are callable objects, so a scheduler's
state_dict records them and resuming restores the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def decay(progress: float, shape: str, min_ratio: float) -> float:
    """The multiplier at ``progress`` in [0, 1] of a decay from 1 to ``min_ratio``."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        value = 1.0 - p
    elif shape == "cosine":
        value = 0.5 * (1.0 + math.cos(math.pi * p))
    elif shape == "1-sqrt":
        value = 1.0 - math.sqrt(p)
    else:
        raise ValueError(f"decay shape {shape!r} is not allowed; allowed: {', '.join(DECAY_SHAPES)}")
    return min_ratio + (1.0 - min_ratio) * value


def _ramp(step: int, start: int, length: int) -> float:
    """Progress of a phase of ``length`` steps starting at ``start``: 0 at its first step, 1 at its last."""
    return 1.0 if length <= 1 else (step - start) / (length - 1)


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup as transformers does it: step / warmup_steps, then 1."""
    return step / max(1, warmup_steps) if step < warmup_steps else 1.0


@dataclass
class FusedSchedule:
    """warmup -> stable until ``switch_step`` -> decay over the QAT steps ``[switch_step, total_steps)``."""

    total_steps: int
    switch_step: int
    warmup_steps: int = 0
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        warmup = min(self.warmup_steps, self.switch_step) if self.switch_step > 0 else self.warmup_steps
        if step < self.switch_step or (self.switch_step == 0 and step < warmup):
            return _warmup(step, warmup)
        start = max(self.switch_step, warmup if self.switch_step == 0 else self.switch_step)
        return decay(_ramp(step, start, self.total_steps - start), self.decay_shape, self.min_lr_ratio)


@dataclass
class ClassicSchedule:
    """FP: warmup -> stable -> cooldown to the minimum; QAT: re-warmup to the peak -> decay to the minimum."""

    total_steps: int
    switch_step: int
    warmup_steps: int = 0
    fp_cooldown_steps: int = 0
    qat_warmup_steps: int = 0
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.switch_step:
            warmup = min(self.warmup_steps, self.switch_step)
            cooldown_start = max(warmup, self.switch_step - self.fp_cooldown_steps)
            if step < warmup:
                return _warmup(step, warmup)
            if step < cooldown_start:
                return 1.0
            return decay((step - cooldown_start + 1) / (self.switch_step - cooldown_start), self.decay_shape,
                         self.min_lr_ratio)
        qat_steps = self.total_steps - self.switch_step
        rewarm = min(self.qat_warmup_steps, max(qat_steps - 1, 0))
        if self.switch_step == 0:
            rewarm = max(rewarm, min(self.warmup_steps, max(qat_steps - 1, 0)))
        offset = step - self.switch_step
        if offset < rewarm:
            low = self.min_lr_ratio if self.switch_step > 0 else 0.0
            return low + (1.0 - low) * (offset + 1) / (rewarm + 1)
        start = self.switch_step + rewarm
        return decay(_ramp(step, start, self.total_steps - start), self.decay_shape, self.min_lr_ratio)


def make_schedule(
    total_steps: int,
    switch_step: int,
    warmup_steps: int = 0,
    fuse_cooldown: bool = True,
    decay_shape: str = "linear",
    min_lr_ratio: float = 0.0,
    fp_cooldown_fraction: float = 0.2,
    qat_warmup_fraction: float = 0.05,
) -> FusedSchedule | ClassicSchedule:
    """The LR multiplier of a run of ``total_steps`` that switches to QAT at ``switch_step``."""
    if not 0 <= switch_step < total_steps:
        raise ValueError(f"switch_step must be in [0, total_steps={total_steps}), got {switch_step}")
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(f"decay shape {decay_shape!r} is not allowed; allowed: {', '.join(DECAY_SHAPES)}")
    if fuse_cooldown:
        return FusedSchedule(total_steps, switch_step, warmup_steps, decay_shape, min_lr_ratio)
    return ClassicSchedule(
        total_steps, switch_step, warmup_steps,
        fp_cooldown_steps=int(round(fp_cooldown_fraction * switch_step)),
        qat_warmup_steps=int(round(qat_warmup_fraction * (total_steps - switch_step))),
        decay_shape=decay_shape, min_lr_ratio=min_lr_ratio,
    )


def wsd_schedule(total_steps: int, warmup_steps: int = 0, cooldown_fraction: float = 0.2, decay_shape: str = "linear",
                 min_lr_ratio: float = 0.0) -> FusedSchedule:
    """Warmup-stable-decay for an FP-only run: the fused shape with the decay over the last
    ``cooldown_fraction`` of the steps (the FP baseline the paper compares with)."""
    decay_steps = max(1, int(round(cooldown_fraction * total_steps)))
    return FusedSchedule(total_steps, total_steps - decay_steps, warmup_steps, decay_shape, min_lr_ratio)


def lambda_lr(optimizer: torch.optim.Optimizer, multiplier) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying ``multiplier`` to every param group of ``optimizer``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [multiplier] * len(optimizer.param_groups))
