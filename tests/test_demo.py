"""The main job, shortened: FP, PTQ and planned QAT on offline text; QAT beats PTQ at 2 bits."""

from __future__ import annotations

import json
import math

import pytest

from hf_qat.demo.corpus import load_stdlib_corpus, make_blocks, train_tokenizer
from hf_qat.demo.run import DemoSettings, run_demo
from helpers import without_package

pytestmark = pytest.mark.slow


def test_corpus_and_tokenizer_are_offline_and_deterministic():
    a = load_stdlib_corpus(200_000, 20_000)
    b = load_stdlib_corpus(200_000, 20_000)
    assert a.train_text == b.train_text and a.eval_text and a.train_bytes >= 200_000
    tok = train_tokenizer(a.train_text, 300)
    blocks = make_blocks(a.train_text, tok, 64)
    assert blocks.shape[1] == 64 and int(blocks.max()) < 300
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        train_tokenizer(a.train_text, 128)
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


def test_quick_demo_branches_the_planned_switch_and_the_baselines(tmp_path):
    result = run_demo(DemoSettings.quick(output_dir=str(tmp_path)))
    losses = result.losses
    assert set(losses) == {"fp", "ptq", "qat", "paretoq_10pct", "switch_at_half", "exported"}
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["qat"] < losses["ptq"] and losses["fp"] < losses["ptq"]
    assert 0 < result.switch_step < result.settings["steps"]
    assert result.switch_step == round((1 - result.fractions["qat"]) * result.settings["steps"])
    assert result.winner == min(("qat", "paretoq_10pct", "switch_at_half"), key=losses.get)
    assert result.tokens["branched_tokens"] < result.tokens["unbranched_tokens"]
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["losses"] == losses
    assert abs(losses["exported"] - losses["qat"]) < 1e-5  # the export computes what the QAT model computed


def test_a_missing_loader_package_stops_the_demo_before_it_trains(tmp_path, monkeypatch):
    """The demo ends by reloading its compressed-tensors export: without that package it says so at once, not
    after minutes of training."""
    without_package(monkeypatch, "compressed_tensors")
    with pytest.raises(ImportError, match=r"needs the compressed_tensors package \(pip install 'hf_qat\[export\]'\)"):
        run_demo(DemoSettings.quick(output_dir=str(tmp_path)))
    assert not (tmp_path / "sweep").exists()
