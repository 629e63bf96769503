"""A law knows the N and D it was fitted on: a query outside is flagged, and equal predictions are a tie."""

from __future__ import annotations

import json
import os

from hf_qat.cli import main
from hf_qat.planner import QATScalingLaw, load_runs, plan_qat
from hf_qat.planner.law import ILLUSTRATIVE_PARAMS
from hf_qat.sweep.report import law_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(ROOT, "recipes", "laws", "stdlib_cpu.json")
ROWS = os.path.join(ROOT, "docs", "replication", "runs.jsonl")
FOUR_BIT = ["4", "int4-g32", "mxfp4", "nvfp4"]


def test_the_shipped_law_stores_the_ranges_of_the_rows_it_was_fitted_on():
    with open(ROWS, encoding="utf-8") as fh:
        rows = law_rows([json.loads(line) for line in fh if line.strip()])
    law = QATScalingLaw.load(SHIPPED)
    assert len(rows) == law.diagnostics["runs"]
    runs = load_runs(rows)
    tokens = runs.fp_tokens + runs.qat_tokens
    assert law.diagnostics["fitted_range"] == {"num_params": [runs.num_params.min(), runs.num_params.max()],
                                               "tokens": [tokens.min(), tokens.max()],
                                               "bits": sorted(set(runs.bits[runs.bits == runs.bits]))}


def test_a_fit_records_its_range():
    truth = QATScalingLaw(dict(ILLUSTRATIVE_PARAMS))
    runs = truth.simulate_runs([1e6, 4e6], [2, 4], [20, 80], [0.1, 0.5])
    law = QATScalingLaw.fit(runs, starts=2, max_iter=200)
    assert law.diagnostics["fitted_range"] == {"num_params": [1e6, 4e6], "tokens": [2e7, 3.2e8], "bits": [2.0, 4.0]}
    assert law.range_warning(2e6, 1e8) is None and law.range_warning(2e6, 1e8, [4, 2, None]) is None
    assert law.range_warning(2e6, 1e8, [1, 3, 4]) == ("B=1, 3 (fitted on B=2, 4) lies outside the runs the law was "
                                                      "fitted on: its predicted losses are an extrapolation")
    old = QATScalingLaw(dict(law.params), {"fitted_range": {"num_params": [1e6, 4e6], "tokens": [2e7, 3.2e8]}})
    assert old.range_warning(2e6, 1e8, [3]) is None  # a law fitted before bit widths were recorded: N and D only
    assert "N=8M (fitted on 1M to 4M) lies outside" in law.range_warning(8e6, 1e8)
    assert law.range_warning(2e6, 1e9).startswith("D=1B (fitted on 20M to 320M) lies outside")


def test_best_bits_far_outside_the_range_warns_and_reports_the_tie():
    law = QATScalingLaw.load(SHIPPED)
    choice = law.best_bits(1e9, 100e9, candidates=FOUR_BIT)
    assert sorted(row["format"] for row in choice.ties) == sorted(FOUR_BIT)
    assert len(choice.warnings) == 1 and "extrapolation" in choice.warnings[0]
    assert "N=1.78B to 2B (fitted on 41.1K to 230K)" in choice.warnings[0]
    inside = law.best_bits(50e3, 1e6, candidates=[2, 4])
    assert inside.ties == [] and inside.warnings == []  # 100K to 200K parameters, 1M tokens, 2 and 4 bits: fitted there
    three = law.best_bits(50e3, 1e6, candidates=[2, 3, 4])  # no 3-bit run behind the law
    assert three.warnings == ["B=3 (fitted on B=1.58, 2, 4) lies outside the runs the law was fitted on: its "
                              "predicted losses are an extrapolation"]


def test_a_plan_with_the_law_outside_its_range_warns():
    law = QATScalingLaw.load(SHIPPED)
    far = plan_qat(1e9, 20e9, 4, total_steps=1000, law=law)
    assert any("extrapolation" in w and "N=1B" in w for w in far.warnings)
    near = plan_qat(131e3, 1e6, 2, total_steps=488, law=law)
    assert not any("the law was fitted on" in w for w in near.warnings)


def test_the_cli_says_tie_and_drops_the_empty_loss_column(capsys):
    assert main(["best-bits", "--memory", "1GB", "--tokens", "100B", "--law", SHIPPED,
                 "--candidates", ",".join(FOUR_BIT)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    tied = QATScalingLaw.load(SHIPPED).best_bits(1e9, 100e9, candidates=FOUR_BIT).ties[0]["predicted_loss"]
    assert "no single best bit width" in out and f"tie at a predicted loss of {tied:.4f}" in out
    assert "extrapolation" in out
    assert main(["plan", "--params", "135M", "--tokens", "10B", "--bits", "4", "--steps", "20000"]) == 0
    out = capsys.readouterr().out
    assert "pred. loss" not in out and "predicted losses need a fitted law" in out
