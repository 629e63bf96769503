"""The compute-optimal QAT planner (arXiv 2509.22935): when to switch to QAT, the loss law, the best
bit width under a memory budget."""

from .fraction import FITTED_RANGE, PAPER_A, effective_bits, optimal_qat_fraction, range_warning, tokens_per_parameter_byte
from .law import ILLUSTRATIVE_PARAMS, BitsChoice, QATScalingLaw, Runs, load_runs
from .plan import BASELINES, Plan, plan_qat, switch_step_for

__all__ = [
    "BASELINES",
    "FITTED_RANGE",
    "Plan",
    "plan_qat",
    "switch_step_for",
    "PAPER_A",
    "BitsChoice",
    "ILLUSTRATIVE_PARAMS",
    "QATScalingLaw",
    "Runs",
    "effective_bits",
    "load_runs",
    "optimal_qat_fraction",
    "range_warning",
    "tokens_per_parameter_byte",
]
