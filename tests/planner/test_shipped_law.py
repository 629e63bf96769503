"""The law fitted on hf_qat's own replication sweep (recipes/laws/) drives plan and best-bits."""

from __future__ import annotations

import json
import os
import re

from hf_qat.cli import main
from hf_qat.planner import QATScalingLaw

LAW = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "laws", "stdlib_cpu.json")


def test_the_shipped_law_has_its_diagnostics():
    data = json.load(open(LAW))
    law = QATScalingLaw.load(LAW)
    diag = law.diagnostics
    assert diag["runs"] >= 100 and diag["mean_abs_relative_error"] < 0.05
    assert len(diag["leave_one_budget_out"]) == 3 and all(0 < v < 0.2 for v in diag["leave_one_budget_out"].values())
    assert "fitted_on" in diag and data["params"] == law.params


def test_plan_with_the_shipped_law_predicts_every_schedule_row_and_best_bits_works(capsys):
    assert main(["plan", "--params", "131K", "--tokens", "1M", "--bits", "2", "--steps", "488", "--law", LAW]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if re.match(r"^\W*(planner|ParetoQ|half|QAT from|PTQ)", line)]
    assert len(rows) == 5, printed
    assert all(re.search(r"\d\.\d{4}\s*\S?\s*$", row) for row in rows), printed
    assert main(["best-bits", "--memory", "64KB", "--tokens", "1M", "--law", LAW, "--candidates", "1.58,2,4"]) == 0
    assert "best bit width" in capsys.readouterr().out
