"""The observed optimum where the grid brackets it, a bound where it does not, and the figures that
count only the measured optima (with their bootstrap intervals)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import yaml

from hf_qat.planner import optimal_qat_fraction, tokens_per_parameter_byte
from hf_qat.sweep import SweepConfig
from hf_qat.sweep.analysis import (Optimum, bootstrap_interval, cells, moe_comparison, optimum_seed_spread,
                                   paper_comparison, refined_optimum, spearman)
from hf_qat.sweep.config import DEFAULT_FRACTIONS
from hf_qat.sweep.report import sweep_report

RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "sweeps")
GRID = (0.03, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0)


def curve(optimum: float, fractions=GRID, ptq: float | None = 4.0) -> dict[float, float]:
    """A loss convex in log f with its minimum at ``optimum``, and a PTQ row."""
    losses = {f: 3.0 + 0.1 * (math.log(f) - math.log(optimum)) ** 2 for f in fractions}
    return losses if ptq is None else {0.0: ptq, **losses}


def test_at_the_lower_edge_the_ptq_point_closes_the_bracket_and_the_optimum_is_a_bound():
    low = curve(0.01)  # increasing over the whole grid: the best QAT fraction is the smallest
    assert refined_optimum(low) == Optimum(0.05, "<=")  # PTQ worse: the optimum lies below the next fraction
    assert refined_optimum({**low, 0.0: 2.0}) == Optimum(0.03, "<=")  # PTQ best: below the smallest QAT fraction
    assert refined_optimum(curve(0.01, ptq=None)) == Optimum(0.05, "<=")  # no PTQ row: f >= 0 anyway
    assert refined_optimum(curve(3.0)) == Optimum(0.5, ">=")  # decreasing to f = 1: above the one below it
    assert refined_optimum({0.0: 4.0, 0.5: 3.0}) == Optimum(0.0, ">=")  # one QAT fraction: only "> 0"
    # one step inside the grid, the same curve is measured, and the parabola in log f finds it exactly
    inside = refined_optimum(curve(0.04))
    assert inside.measured and inside.value == pytest.approx(0.04, rel=1e-9)


def test_bound_formatting_and_what_satisfies_it():
    assert str(Optimum(0.05, "<=")) == "<= 0.05" and str(Optimum(0.5, ">=")) == ">= 0.5"
    assert str(Optimum(0.1234)) == "0.123"
    assert Optimum(0.05, "<=").satisfied_by(0.04) and not Optimum(0.05, "<=").satisfied_by(0.06)
    assert Optimum(0.5, ">=").satisfied_by(0.7) and not Optimum(0.5, ">=").satisfied_by(0.2)
    assert not Optimum(0.1).satisfied_by(0.1)  # a measured value is not a bound


def rows_of(size: str, num_params: int, budget: float, losses: dict[float, float], seed: int = 0,
            active: int | None = None) -> list[dict]:
    rows = []
    for fraction, loss in losses.items():
        row = {"size": size, "seed": seed, "budget": budget, "bits": 2, "num_params": num_params, "fp_tokens": 0,
               "qat_tokens": int(budget), "schedule": "fused" if fraction else "ptq", "fraction": fraction,
               "loss": loss, "key": f"{size}/seed{seed}/{budget:g}/2/{fraction:g}/fused"}
        if active:
            row["active_params"] = active
        rows.append(row)
    return rows


def sweep_rows() -> list[dict]:
    """Five measured cells (optima 0.07 .. 0.35) and two pinned at the smallest fraction, far from f_hat."""
    rows = []
    for i, (budget, optimum) in enumerate(((2e5, 0.07), (5e5, 0.12), (1e6, 0.2), (2e6, 0.28), (4e6, 0.35))):
        rows += rows_of(f"m{i}", 50_000, budget, curve(optimum))
    rows += rows_of("p0", 20_000, 4e6, curve(0.005))  # S = 800: f_hat 0.37, the bound "<= 0.05" excludes it
    rows += rows_of("p1", 400_000, 2e5, curve(0.005))  # S = 2: f_hat 0, within the bound
    return rows


def test_mae_and_rank_correlation_count_only_measured_optima():
    cell_list = cells(sweep_rows())
    measured = [c for c in cell_list if c.observed_optimum.measured]
    assert len(cell_list) == 7 and len(measured) == 5
    stats = paper_comparison(cell_list)["all"]
    errors = [c.observed_optimum.value - optimal_qat_fraction(c.tokens_per_param_byte) for c in measured]
    assert stats["measured"] == 5 and stats["bounds"] == 2 and stats["bounds_satisfied_by_f_hat"] == 1
    assert stats["mae"] == pytest.approx(np.mean(np.abs(errors)))
    assert stats["mean_signed_error"] == pytest.approx(np.mean(errors))
    assert stats["spearman_optimum_vs_S"] == pytest.approx(
        spearman([c.tokens_per_param_byte for c in measured], [c.observed_optimum.value for c in measured]))
    # counted as values, the bounds would raise the MAE: the figure above is not theirs
    every = [abs(c.observed_optimum.value - c.paper_fraction) for c in cell_list]
    assert np.mean(every) != pytest.approx(stats["mae"])
    low, high = stats["mae_interval"]
    assert low <= stats["mae"] <= high and low < high


def test_bootstrap_interval_is_reproducible_and_covers_the_statistic():
    samples = np.arange(20.0)[:, None]
    mean = lambda x: float(np.mean(x))  # noqa: E731
    low, high = bootstrap_interval(samples, mean)
    assert (low, high) == bootstrap_interval(samples, mean)  # a fixed seed
    assert low < 9.5 < high and high - low < 19
    assert bootstrap_interval(samples, mean, seed=1) != (low, high)
    assert all(math.isnan(v) for v in bootstrap_interval(samples[:2], mean))


def test_moe_comparison_leaves_out_the_bounds():
    rows = rows_of("moe", 700_000, 1e6, curve(0.2), active=250_000)
    rows += rows_of("moe", 700_000, 2e5, curve(0.005), active=250_000)  # pinned: "<= 0.05"
    rows += rows_of("dense", 250_000, 1e6, curve(0.2))
    result = moe_comparison(cells(rows))["moe"]
    moe = next(c for c in cells(rows) if c.active_params and c.observed_optimum.measured)
    assert result["measured"] == 1 and result["bounds"] == 1
    assert result["mae_total"] == pytest.approx(abs(0.2 - optimal_qat_fraction(tokens_per_parameter_byte(700_000, 1e6, 2))))
    assert result["total_minus_active"] == pytest.approx(
        result["mae_total"] - abs(moe.observed_optimum.value - moe.paper_fraction_with("active")))
    # f_hat at S = 2e5 tokens per 175 KB (total) is 0.005, at 62.5 KB (active) 0.05: both within "<= 0.05"
    assert result["bounds_satisfied_total"] == 1


def test_the_report_flags_bounds_and_its_figures_exclude_them(tmp_path):
    with open(tmp_path / "runs.jsonl", "w", encoding="utf-8") as fh:
        for row in sweep_rows() + rows_of("m0", 50_000, 2e5, curve(0.09), seed=1):
            fh.write(json.dumps(row) + "\n")
    report = sweep_report(tmp_path, fit=False)
    text = open(report.markdown_path, encoding="utf-8").read()
    cell_table = text.split("## Against")[0]
    table = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line for line in cell_table.splitlines()
             if line.startswith("| p") or line.startswith("| m")}
    assert table["p0/0"].rstrip(" |").split("|")[-2].strip() == "<= 0.05"  # the f* column
    bounds = text.split("## Bounds")[1].split("##")[0]  # listed apart, with f_hat and whether it is within
    assert "| p0 | 0 | 4e+06 | 2 | 800 | <= 0.05 | 0.365 | no |" in bounds and "| <= 0.05 | 0.000 | yes |" in bounds
    stats = report.summary["paper"]["all"]
    assert f"| all | 6 of 8 | " in text and f"{stats['mae']:.3f} [{stats['mae_interval'][0]:.3f}, " in text
    spread = optimum_seed_spread(cells(read(tmp_path)))
    assert spread == [{"key": "m0/200000/2", "seeds": 2, "optima": ["0.070", "0.090"],
                       "spread": pytest.approx(0.02)}]
    assert "| m0/200000/2 | 2 | 0.070, 0.090 | 0.020 |" in text


def read(folder) -> list[dict]:
    with open(os.path.join(folder, "runs.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_default_fractions_bracket_an_optimum_near_a_tenth():
    config = SweepConfig.from_dict({"sizes": {"s": {"hidden_size": 32}}, "budgets": [1e6], "bits": [2]})
    assert config.fractions == list(DEFAULT_FRACTIONS)
    assert {0.03, 0.05, 0.15} <= set(config.fractions) and 0.0 in config.fractions
    assert refined_optimum(curve(0.1, fractions=[f for f in DEFAULT_FRACTIONS if f > 0])).measured
    for name in ("replication", "moe", "fp4"):
        with open(os.path.join(RECIPES, f"{name}.yaml"), encoding="utf-8") as fh:
            assert {0.03, 0.05, 0.15} <= set(yaml.safe_load(fh)["fractions"]), name
