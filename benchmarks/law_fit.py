"""Fit time and accuracy of the loss law on 800 simulated runs (issue target: under 30 s on 2 cores).

    python benchmarks/law_fit.py [--out benchmarks/results/law_fit.json]

The runs come from the illustrative law (hf_qat.planner.ILLUSTRATIVE_PARAMS) with 0.2 % noise: 4 sizes x
4 bit widths x 5 budgets x 10 QAT fractions = 800 runs (+ 20 FP-only runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from hf_qat.planner import ILLUSTRATIVE_PARAMS, QATScalingLaw

SIZES = (3e7, 1e8, 3e8, 1e9)
BITS = (1, 2, 4, 6)
BUDGETS = (10, 30, 100, 300, 1000)
FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 0.95)
HELD_OUT = [(5e7, 50, 2), (2e8, 500, 4), (1e8, 200, 3), (2e8, 20, 1), (5e8, 800, 6)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "law_fit.json"))
    args = parser.parse_args()
    truth = QATScalingLaw(ILLUSTRATIVE_PARAMS)
    runs = truth.simulate_runs(SIZES, BITS, BUDGETS, FRACTIONS, noise=0.002, seed=0)
    started = time.perf_counter()
    law = QATScalingLaw.fit(runs)
    seconds = time.perf_counter() - started
    rows = []
    for n, per_param, bits in HELD_OUT:
        d = per_param * n
        f_true, f_fit = truth.optimal_fraction(n, d, bits), law.optimal_fraction(n, d, bits)
        best = truth.predict(n, (1 - f_true) * d, f_true * d, bits)
        at_fit = truth.predict(n, (1 - f_fit) * d, f_fit * d, bits)
        rows.append({"num_params": n, "tokens": d, "bits": bits, "f_true": f_true, "f_fit": f_fit,
                     "loss_gap_pct": 100 * (at_fit / best - 1)})
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "runs": len(runs), "fit_seconds": round(seconds, 2), "starts_used": law.diagnostics["starts"],
        "mean_abs_relative_error": law.diagnostics["mean_abs_relative_error"], "held_out": rows,
    }
    print(f"fitted {len(runs)} runs in {seconds:.1f} s ({law.diagnostics['starts']} starts), "
          f"mean |relative error| {law.diagnostics['mean_abs_relative_error']:.3%}")
    for row in rows:
        print(f"  N={row['num_params']:.3g} D={row['tokens']:.3g} B={row['bits']}: f_true {row['f_true']:.3f} "
              f"f_fit {row['f_fit']:.3f} loss gap {row['loss_gap_pct']:.4f} %")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
