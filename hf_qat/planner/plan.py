"""plan_qat: how many of a run's tokens go to QAT, and at which optimizer step QAT starts.

Token accounting: a run trains on ``total_tokens`` new tokens; a pretrained
checkpoint already saw ``pretrained_tokens`` in full precision. The planner works on
``D_total = pretrained_tokens + total_tokens``: the optimal QAT fraction f of D_total gives the
optimal QAT tokens ``f * D_total``. They are taken from the end of this run; when they exceed the
run, QAT starts at step 0 and the plan says how many QAT tokens the optimum would want.

Strategies: "paper" (the fitted formula f_hat = exp(-a / ln S_total), arXiv 2509.22935), "law" (the
fraction that minimises a fitted :class:`QATScalingLaw`), "fixed" (a given fraction of this run).
Baselines for comparison: ParetoQ's 10 % QAT, torchtune's switch at half, QAT from step 0, PTQ.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..bits import bits_label, normalize_bits
from ..config import CHOICES
from ..counts import human
from .fraction import PAPER_A, optimal_qat_fraction, range_warning, tokens_per_parameter_byte
from .law import QATScalingLaw
from .storage import weight_format

STRATEGIES = (*CHOICES["strategy"], "fixed")  # "fixed": a given fraction (the callback's int or float start)
MOE_PARAMS = CHOICES["moe_params"]
BASELINES = {"paretoq_10pct": 0.1, "switch_at_half": 0.5, "qat_from_start": 1.0, "ptq": 0.0}


@dataclass
class Plan:
    """A QAT plan. Fractions of ``qat_fraction`` refer to D_total (pretrained + this run); those of
    ``run_qat_fraction`` to this run's tokens and steps."""

    strategy: str
    num_params: float
    bits: float | int
    total_tokens: float
    pretrained_tokens: float
    d_total: float
    tokens_per_param_byte: float
    qat_fraction: float
    optimal_qat_tokens: float
    qat_tokens: float
    fp_tokens: float
    run_fp_tokens: float
    run_qat_fraction: float
    total_steps: int | None = None
    tokens_per_step: float | None = None
    tokens_per_step_source: str | None = None
    switch_step: int | None = None
    predicted_loss: float | None = None
    warnings: list[str] = field(default_factory=list)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    active_params: float | None = None
    moe_params: str = "total"
    method: str | None = None
    storage_bits: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for logs."""
        step = f", switch at step {self.switch_step} of {self.total_steps}" if self.switch_step is not None else ""
        loss = f", predicted loss {self.predicted_loss:.4f}" if self.predicted_loss is not None else ""
        if self.active_params is not None:
            step += (f", N={self.num_params:.3g} total / {self.active_params:.3g} active parameters, S from the "
                     f"{self.moe_params}")
        weights = f"{bits_label(self.bits)}-bit"
        own = weight_format(self.bits, self.method) if self.method is not None else None
        if own is not None and self.storage_bits not in (None, own.storage_bits):  # a mix (gguf_mix)
            weights = f"{self.method}-based mix ({self.storage_bits:.3g} bits per weight on average, scales included)"
        elif own is not None and self.method == own.name:
            weights = f"{self.method} ({self.storage_bits:g} bits per weight with its scales)"
        return (
            f"{weights} QAT on {self.run_qat_fraction:.1%} of the run "
            f"({self.qat_tokens:.3g} of {self.total_tokens:.3g} tokens; optimal fraction {self.qat_fraction:.3f} of "
            f"D_total={self.d_total:.3g}, S={self.tokens_per_param_byte:.3g}{step}{loss})"
        ) + "".join(f". {line}" for line in self.advice())

    def advice(self) -> list[str]:
        """What to do with the plan: the start that reproduces it, and why a fine-tune runs QAT from step 0."""
        lines = []
        if self.strategy != "fixed" and self.switch_step is not None:
            lines.append(f"QATConfig(start={self.switch_step}) pins this switch")
        if self.pretrained_tokens and self.optimal_qat_tokens > self.total_tokens * (1 + 1e-12):
            lines.append(f"A fine-tune of a model pretrained on {human(self.pretrained_tokens)} tokens runs QAT from "
                         f"step 0: the optimum wants {human(self.optimal_qat_tokens)} QAT tokens")
        return lines


def _steps(total_tokens: float, total_steps: int | None, tokens_per_step: float | None) -> tuple[int | None, float | None]:
    if total_steps is not None and total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if tokens_per_step is not None and tokens_per_step <= 0:
        raise ValueError(f"tokens_per_step must be > 0, got {tokens_per_step}")
    if (total_steps is not None and tokens_per_step is not None
            and abs(total_steps * tokens_per_step - total_tokens) > tokens_per_step):
        raise ValueError(f"total_steps x tokens_per_step = {total_steps} x {tokens_per_step:.6g} = "
                         f"{total_steps * tokens_per_step:.6g} tokens, but total_tokens is {total_tokens:.6g}: give "
                         "two of the three that agree, or one of total_steps / tokens_per_step")
    if total_steps is None and tokens_per_step is not None:
        total_steps = max(1, int(round(total_tokens / tokens_per_step)))
    if tokens_per_step is None and total_steps is not None:
        tokens_per_step = total_tokens / total_steps
    return total_steps, tokens_per_step


def switch_step_for(run_qat_fraction: float, total_steps: int) -> int:
    """round((1 - f) * total_steps): the step at which a QAT fraction f of the run starts."""
    return int(round((1.0 - run_qat_fraction) * total_steps))


def plan_qat(
    num_params: float,
    total_tokens: float,
    bits: float | int | str,
    total_steps: int | None = None,
    tokens_per_step: float | None = None,
    law: QATScalingLaw | str | os.PathLike | None = None,
    strategy: str = "paper",
    fraction: float | None = None,
    pretrained_tokens: float | None = None,
    a: float = PAPER_A,
    tokens_per_step_source: str | None = None,
    active_params: float | None = None,
    moe_params: str = "total",
    method: str | None = None,
    storage_bits: float | None = None,
) -> Plan:
    """Plan the QAT phase of a run.

    Args:
        num_params: N, the model's parameters (the paper counts all of them, tied tensors once).
        total_tokens: the tokens of this run.
        bits: the weight bit width (1, 1.58/"ternary", 2, 3, 4, 5, 6, 8).
        total_steps / tokens_per_step: give either to get ``switch_step``.
        law: a fitted :class:`QATScalingLaw` (or its JSON path) for ``predicted_loss`` and strategy "law".
        strategy: "paper", "law" or "fixed" (with ``fraction``, of this run).
        pretrained_tokens: FP tokens the starting checkpoint already saw (counted in D_total).
        a: the constant of the paper's formula.
        tokens_per_step_source: how ``tokens_per_step`` was counted (recorded in the plan).
        active_params: for a mixture of experts, the parameters one token uses (all but the experts it is
            not routed to); recorded in the plan.
        method: the quantizer family; a block-scaled format (MXFP4, NVFP4) stores its block scales with
            every weight, so S counts its bits per weight in memory (4.25, 4.5: ``Plan.storage_bits``)
            instead of ``bits`` (a law still predicts at ``bits``; it knows no element grid).
        moe_params: which N the tokens per parameter byte (and a law) use: "total" (every parameter, what
            memory holds; the default) or "active" (``active_params``). Which one predicts the optimum of an
            MoE is an open question (docs/moe.md).
        storage_bits: the bits per weight in memory when the model mixes formats (a ``gguf_mix``: the mean
            over its weights, :func:`hf_qat.model.file_type.mean_storage_bits`); None: the ``method``'s.
    """
    bits = normalize_bits(bits)
    pretrained = float(pretrained_tokens or 0.0)
    law = _check_plan_inputs(num_params, total_tokens, pretrained, law, strategy, fraction)
    n = _planner_params(float(num_params), active_params, moe_params)  # the N behind S
    total_steps, tokens_per_step = _steps(total_tokens, total_steps, tokens_per_step)
    d_total = pretrained + float(total_tokens)
    storage_bits = storage_bits or weight_format(bits, method).storage_bits
    s_total = tokens_per_parameter_byte(n, d_total, bits, storage_bits)
    warnings: list[str] = []
    if strategy != "fixed" and (text := range_warning(s_total)):
        warnings.append(text)

    if strategy == "paper":
        f = optimal_qat_fraction(s_total, a)
    elif strategy == "law":
        f = law.optimal_fraction(n, d_total, bits, pretrained_tokens=pretrained)
    else:
        f = fraction * total_tokens / d_total
    optimal_qat_tokens = f * d_total
    qat_tokens = min(optimal_qat_tokens, float(total_tokens))
    if optimal_qat_tokens > total_tokens * (1 + 1e-12):
        warnings.append(
            f"the optimum wants {optimal_qat_tokens:.3g} QAT tokens but this run has {total_tokens:.3g}: QAT starts at "
            "step 0 (train longer to reach the optimum)"
        )
    run_f = qat_tokens / total_tokens
    switch = None
    if total_steps is not None:
        switch = switch_step_for(run_f, total_steps)
        if switch >= total_steps:
            switch = total_steps - 1
            warnings.append(
                f"the optimal fraction {f:.3g} gives no whole QAT step in {total_steps} steps; QAT runs for the last step only"
            )
            run_f = 1.0 / total_steps  # what the run does: one QAT step (the optimum stays in optimal_qat_tokens)
            qat_tokens = run_f * float(total_tokens)
    plan = Plan(
        strategy=strategy, num_params=float(num_params), bits=bits, total_tokens=float(total_tokens),
        pretrained_tokens=pretrained, d_total=d_total, tokens_per_param_byte=s_total, qat_fraction=f,
        optimal_qat_tokens=optimal_qat_tokens, qat_tokens=qat_tokens, fp_tokens=d_total - qat_tokens,
        run_fp_tokens=float(total_tokens) - qat_tokens, run_qat_fraction=run_f, total_steps=total_steps,
        tokens_per_step=tokens_per_step, tokens_per_step_source=tokens_per_step_source, switch_step=switch,
        warnings=warnings, active_params=None if active_params is None else float(active_params), moe_params=moe_params,
        method=method, storage_bits=storage_bits,
    )
    if law is not None:
        plan.predicted_loss = float(law.predict(n, plan.fp_tokens, plan.qat_tokens, bits))
        if text := law.range_warning(n, d_total, [bits]):
            plan.warnings.append(text)
    plan.baselines = _baselines(n, float(total_tokens), d_total, bits, total_steps, law)
    return plan


def _planner_params(total: float, active: float | None, moe_params: str) -> float:
    if moe_params not in MOE_PARAMS:
        raise ValueError(f"moe_params={moe_params!r} is not allowed; allowed: {', '.join(MOE_PARAMS)}")
    if active is not None and not (0 < active <= total and math.isfinite(active)):
        raise ValueError(f"active_params must be in (0, num_params={total:.6g}], got {active}")
    if moe_params == "active":
        if active is None:
            raise ValueError("moe_params='active' needs active_params (the parameters one token uses)")
        return float(active)
    return total


def _check_plan_inputs(num_params, total_tokens, pretrained: float, law, strategy: str, fraction) -> QATScalingLaw | None:
    """Validate plan_qat's inputs; returns the law (loaded from its path if given as one)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not allowed; allowed: {', '.join(STRATEGIES)}")
    if not (num_params > 0 and math.isfinite(num_params)):
        raise ValueError(f"num_params must be a finite number > 0, got {num_params}")
    if not (total_tokens > 0 and math.isfinite(total_tokens)):
        raise ValueError(f"total_tokens must be a finite number > 0, got {total_tokens}")
    if pretrained < 0:
        raise ValueError(f"pretrained_tokens must be >= 0, got {pretrained}")
    if isinstance(law, (str, os.PathLike)):
        law = QATScalingLaw.load(law)
    if strategy == "law" and law is None:
        raise ValueError("strategy='law' needs a fitted law (law=QATScalingLaw or a law JSON path)")
    if strategy == "fixed" and (fraction is None or not 0.0 <= fraction <= 1.0):
        raise ValueError(f"strategy='fixed' needs fraction in [0, 1] (of this run), got {fraction}")
    return law


def _baselines(num_params: float, total_tokens: float, d_total: float, bits, total_steps: int | None,
               law: QATScalingLaw | None) -> dict[str, dict[str, Any]]:
    """ParetoQ's 10 %, the switch at half, QAT from the start and PTQ, each with its switch step and,
    with a law, its predicted loss."""
    out = {}
    for name, run_fraction in BASELINES.items():
        qat = run_fraction * total_tokens
        row: dict[str, Any] = {"run_qat_fraction": run_fraction, "qat_tokens": qat}
        if total_steps is not None:
            row["switch_step"] = min(switch_step_for(run_fraction, total_steps), total_steps)
        if law is not None:
            row["predicted_loss"] = float(law.predict(num_params, d_total - qat, qat, bits))
        out[name] = row
    return out
