"""hf_qat's own lines (coverage, plan, switch) show under a plain Trainer run, as a user runs it: a script
that configures no logging, in its own process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

import hf_qat
from hf_qat import plan_qat

TESTS = os.path.dirname(os.path.abspath(__file__))
SCRIPT = f"""
import sys
sys.path.insert(0, {TESTS!r})
from helpers import make_trainer
from hf_qat import QATCallback, QATConfig
make_trainer(sys.argv[1], [QATCallback(QATConfig(bits=4, group_size=16, start="auto", sequence_length=16))],
             max_steps=12).train()
"""


def run_script(tmp_path, **env):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_a_plain_trainer_run_shows_the_coverage_the_plan_and_the_switch(tmp_path):
    out = run_script(tmp_path)
    assert "hf_qat: 14 weights prepared for QAT (lsq); 100.0% of the non-embedding weight elements quantized" in out
    plan_line = next(line for line in out.splitlines() if line.startswith("hf_qat plan: "))
    switch = int(plan_line.split("QATConfig(start=")[1].split(")")[0])
    assert f"switch at step {switch} of 12" in plan_line
    assert f"hf_qat: QAT switched on at step {switch}" in out


def test_the_lines_are_silenced_by_the_environment_variable(tmp_path):
    out = run_script(tmp_path, HF_QAT_VERBOSITY="warning")
    assert "weights prepared" not in out and "pins this switch" not in out and "QAT switched on" not in out
    assert "hf_qat plan: tokens per parameter byte" in out  # warnings still show


def test_set_verbosity_and_bad_levels():
    logger = logging.getLogger("hf_qat")
    before = logger.level
    try:
        hf_qat.set_verbosity("warning")
        assert hf_qat.get_verbosity() == logging.WARNING
        hf_qat.set_verbosity(logging.INFO)
        assert hf_qat.get_verbosity() == logging.INFO
        hf_qat.set_verbosity("WARN")  # logging's alias
        assert hf_qat.get_verbosity() == logging.WARNING
        with pytest.raises(ValueError, match=r"set_verbosity\(level\)='loud' .*debug, info, warning, error, critical"):
            hf_qat.set_verbosity("loud")
    finally:
        logger.setLevel(before)
    proc = subprocess.run([sys.executable, "-c", "import hf_qat"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_QAT_VERBOSITY": "loud"})
    assert proc.returncode != 0 and "HF_QAT_VERBOSITY='loud' is not allowed" in proc.stderr


def test_the_plan_says_what_to_do_with_it():
    plan = plan_qat(135e6, 10e9, 4, total_steps=20000)
    assert "QATConfig(start=14797) pins this switch" in plan.summary()
    finetune = plan_qat(135e6, 1e9, 4, total_steps=1000, pretrained_tokens=2e12)
    assert ("A fine-tune of a model pretrained on 2T tokens runs QAT from step 0: the optimum wants 1.04T QAT tokens"
            in finetune.summary())
    fixed = plan_qat(135e6, 1e9, 4, total_steps=1000, strategy="fixed", fraction=0.5)
    assert "pins" not in fixed.summary()  # a given start needs no advice
