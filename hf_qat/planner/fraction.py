"""Tokens per parameter byte and the paper's optimal QAT fraction (arXiv 2509.22935).

    S_total = D_total / (N * B / 8)          (ternary: B = log2(3))
    f_hat   = exp(-a / ln S_total),  a = 6.7297

The constant was fitted on runs with S_total between about 3.6e1 and 1.3e5; outside that range the
planner still answers but says it is extrapolating.
"""

from __future__ import annotations

import math

from ..bits import effective_bits  # noqa: F401  (re-exported by hf_qat.planner)

PAPER_A = 6.7297
# The S_total range of the paper's runs (86M..2.2B parameters, 1/2/4/6 bits, 2.3B..1.4T tokens).
FITTED_RANGE = (3.5e1, 1.35e5)


def tokens_per_parameter_byte(num_params: float, tokens: float, bits: float | int | str,
                              storage_bits: float | None = None) -> float:
    """S = tokens / (num_params * bits / 8): training tokens per byte of quantized weights.
    ``storage_bits``: the bits per weight in memory when a format stores more than ``bits`` (a block-scaled
    format's scales, see :mod:`hf_qat.planner.storage`)."""
    if not (num_params > 0):
        raise ValueError(f"num_params must be > 0, got {num_params}")
    if not (tokens >= 0):
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return float(tokens) / (float(num_params) * (storage_bits or effective_bits(bits)) / 8.0)


def range_warning(s_total: float) -> str | None:
    """A warning text when ``s_total`` lies outside :data:`FITTED_RANGE`, else None."""
    lo, hi = FITTED_RANGE
    if lo <= s_total <= hi:
        return None
    side = "below" if s_total < lo else "above"
    return (
        f"tokens per parameter byte S={s_total:.3g} is {side} the range the formula was fitted on "
        f"({lo:.2g} to {hi:.2g}, arXiv 2509.22935); the QAT fraction is an extrapolation"
    )


def optimal_qat_fraction(s_total: float, a: float = PAPER_A) -> float:
    """f_hat = exp(-a / ln S_total) for S_total > 1; 0.0 for S_total <= 1, the formula's limit as S
    falls to 1 (below it the formula jumps and has no meaning)."""
    if not (s_total >= 0):
        raise ValueError(f"s_total must be >= 0, got {s_total}")
    if s_total <= 1.0:
        return 0.0
    return math.exp(-a / math.log(s_total))
