"""The runs of a sweep and where each one leaves its size's FP trunk.

Every run of one (size, seed) follows the same trunk, warmup then the stable LR, until its branch
step; from there it is a tail with its own LR multiplier (``hf_qat.schedule``, the callback's own
schedules) and, for QAT runs, its switch step:

=========  ===========================  ================================  ==============================
schedule   fraction                      branch step                       tail
=========  ===========================  ================================  ==============================
fp         0 (bits None)                 start of the FP cooldown          FP cooldown to the end
ptq        0 (one row per bit width)     none: the fp row's final model    round-to-nearest, no training
fused      (0, 1]                        the switch step                   QAT with the whole decay
classic    (0, 1)                        start of the FP cooldown          FP cooldown, QAT re-warmup, decay
classic    1                             0                                 QAT from step 0
=========  ===========================  ================================  ==============================

:func:`plan_runs` finds each branch step as the first step where the run's multiplier leaves the
trunk's (or QAT turns on), so the steps before it are trunk steps and a branched run computes what the
same run from scratch computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..bits import bits_label
from ..config import auto_method
from ..planner.fraction import optimal_qat_fraction, tokens_per_parameter_byte
from ..planner.plan import switch_step_for
from ..schedule import FusedSchedule, make_schedule, wsd_schedule
from .config import AUTO, SweepConfig


@dataclass(frozen=True)
class RunSpec:
    """One row of ``runs.jsonl``.

    Attributes:
        size, seed: which trunk (model size and seed) the run branches from.
        budget: total training tokens; ``total_steps`` optimizer steps.
        bits: None for the FP row.
        fraction: the QAT fraction of the grid (0 for fp and ptq rows).
        schedule: "fp", "ptq", "fused" or "classic".
        switch_step: the step QAT turns on (``total_steps`` for fp and ptq rows: never).
        branch_step: the trunk step the tail starts from (``total_steps`` for ptq: no tail).
        method: the quantizer family (QATConfig.method): "auto", or a family that auto would not
            choose at ``bits`` (:func:`run_method`), which is then part of the key.
    """

    size: str
    seed: int
    budget: float
    total_steps: int
    bits: float | int | None
    fraction: float
    schedule: str
    switch_step: int
    branch_step: int
    method: str = AUTO

    @property
    def key(self) -> str:
        bits = "fp" if self.bits is None else bits_label(self.bits)
        if self.method != AUTO:
            bits += f"-{self.method}"
        return f"{self.size}/seed{self.seed}/{self.budget:.6g}/{bits}/{self.fraction:g}/{self.schedule}"

    @property
    def resolved_method(self) -> str | None:
        """The quantizer family's name (None for the FP row)."""
        if self.bits is None:
            return None
        return auto_method(self.bits) if self.method == AUTO else self.method

    @property
    def tail_steps(self) -> int:
        return self.total_steps - self.branch_step

    def multiplier(self, config: SweepConfig) -> Callable[[int], float]:
        """The LR multiplier of the whole run (step -> factor of the peak LR)."""
        common = dict(warmup_steps=config.warmup_steps, decay_shape=config.decay_shape,
                      min_lr_ratio=config.min_lr_ratio)
        if self.schedule in ("fp", "ptq"):
            return wsd_schedule(self.total_steps, cooldown_fraction=config.fp_cooldown_fraction, **common)
        return make_schedule(self.total_steps, self.switch_step, fuse_cooldown=self.schedule == "fused",
                             fp_cooldown_fraction=config.fp_cooldown_fraction,
                             qat_warmup_fraction=config.qat_warmup_fraction, **common)

    def qat_tokens(self, tokens_per_step: int) -> int:
        return (self.total_steps - self.switch_step) * tokens_per_step if self.schedule != "ptq" else 0


def trunk_multiplier(config: SweepConfig) -> FusedSchedule:
    """Warmup then the stable LR, forever: what every run computes before its branch step."""
    return FusedSchedule(total_steps=1 << 62, switch_step=1 << 61, warmup_steps=config.warmup_steps)


def _branch_step(spec: RunSpec, config: SweepConfig) -> int:
    """The first step at which the run differs from the trunk: its multiplier leaves the trunk's, or
    QAT turns on (so the steps before it are trunk steps, bit for bit)."""
    run, trunk = spec.multiplier(config), trunk_multiplier(config)
    for step in range(spec.switch_step):
        if run(step) != trunk(step):
            return step
    return spec.switch_step


def run_method(bits, method: str) -> str:
    """``method`` as a run's identity at ``bits``: "auto" when auto would choose that family anyway (lsq at
    4 bits: the same runs as a sweep that does not name a method), else the family's name."""
    return AUTO if bits is None or method in (AUTO, auto_method(bits)) else method


def plan_runs(config: SweepConfig) -> list[RunSpec]:
    """Every row of the sweep, once, in a stable order (trunk by trunk, then by branch step)."""
    runs: dict[str, RunSpec] = {}

    def add(size, seed, budget, steps, bits, fraction, schedule, switch, method=AUTO):
        method = run_method(bits, method)
        spec = RunSpec(size, seed, budget, steps, bits, fraction, schedule, switch, 0, method)
        if spec.key in runs:
            return
        branch = steps if schedule == "ptq" else _branch_step(spec, config)
        runs[spec.key] = RunSpec(size, seed, budget, steps, bits, fraction, schedule, switch, branch, method)

    for grid in config.grids:
        for size in grid.sizes:
            for budget in grid.budgets:
                steps = config.total_steps(budget)
                if 0.0 in grid.fractions:
                    add(size, grid.seed, budget, steps, None, 0.0, "fp", steps)
                    for bits in grid.bits:
                        add(size, grid.seed, budget, steps, bits, 0.0, "ptq", steps, grid.method)
                for bits in grid.bits:
                    for fraction in grid.fractions:
                        if fraction == 0.0:
                            continue
                        switch = min(switch_step_for(fraction, steps), steps - 1)
                        for schedule in grid.schedules:
                            add(size, grid.seed, budget, steps, bits, fraction, schedule, switch, grid.method)
    return sorted(runs.values(), key=lambda r: (r.size, r.seed, r.branch_step, r.key))


def branch_points(runs: list[RunSpec]) -> dict[tuple[str, int], list[int]]:
    """(size, seed) -> the sorted trunk steps at which tails start (the trunk's checkpoints)."""
    points: dict[tuple[str, int], set[int]] = {}
    for run in runs:
        if run.schedule != "ptq":
            points.setdefault((run.size, run.seed), set()).add(run.branch_step)
    return {k: sorted(v) for k, v in points.items()}


def token_accounting(runs: list[RunSpec], tokens_per_step: int) -> dict[str, int]:
    """Tokens trained by the branched sweep (trunks + tails) and by the same grid run unbranched."""
    trunks = sum(max(points) for points in branch_points(runs).values())
    tails = sum(r.tail_steps for r in runs if r.schedule != "ptq")
    unbranched = sum(r.total_steps for r in runs if r.schedule != "ptq")
    return {"branched_tokens": (trunks + tails) * tokens_per_step, "trunk_tokens": trunks * tokens_per_step,
            "tail_tokens": tails * tokens_per_step, "unbranched_tokens": unbranched * tokens_per_step}


def paper_fraction(num_params: int, budget: float, bits) -> tuple[float, float]:
    """(S, f_hat) of a run: tokens per parameter byte and the paper's optimal QAT fraction."""
    s = tokens_per_parameter_byte(num_params, budget, bits)
    return s, optimal_qat_fraction(s)
