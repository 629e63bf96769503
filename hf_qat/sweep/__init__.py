"""The paper's experiment on the user's data (arXiv 2509.22935).

``run_sweep(config, out_dir)`` trains one FP trunk per (size, seed) and every (budget, bits,
fraction, schedule) run as a tail branched from it; rows go to ``out_dir/runs.jsonl``, which
``hf-qat fit`` reads as it is. ``sweep_report(out_dir)`` writes the plots and the markdown table.
"""

from .config import SweepConfig, SweepConfigError
from .grid import RunSpec, plan_runs, token_accounting
from .runner import SweepSummary, run_sweep

__all__ = ["RunSpec", "SweepConfig", "SweepConfigError", "SweepSummary", "plan_runs", "run_sweep", "token_accounting"]
