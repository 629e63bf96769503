"""Fitting the loss law on runs generated from a known law (issue: fit accuracy acceptance)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_qat.planner import ILLUSTRATIVE_PARAMS, QATScalingLaw, load_runs

TRUE = ILLUSTRATIVE_PARAMS
SIZES = (3e7, 1e8, 3e8)
BITS = (1, 2, 4, 6)
BUDGETS = (10, 30, 100, 300, 1000)  # tokens per parameter
FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9)


def synthetic_runs(noise=0.002, seed=0):
    truth = QATScalingLaw(TRUE)
    return truth, truth.simulate_runs(SIZES, BITS, BUDGETS, FRACTIONS, noise=noise, seed=seed)


@pytest.fixture(scope="module")
def fitted():
    truth, runs = synthetic_runs()
    assert len(runs) >= 3 * 4 * 5 * 7
    return truth, QATScalingLaw.fit(runs, bootstrap=8), runs


HELD_OUT = [(5e7, 50, 2), (2e8, 500, 4), (1e8, 200, 3), (2e8, 20, 1), (5e7, 800, 6), (1.5e8, 100, 4)]


@pytest.mark.parametrize("n,d_per_n,bits", HELD_OUT)
def test_fitted_law_recovers_the_optimum_on_held_out_settings(fitted, n, d_per_n, bits):
    truth, law, _ = fitted
    d = d_per_n * n
    f_true = truth.optimal_fraction(n, d, bits)
    f_fit = law.optimal_fraction(n, d, bits)
    assert abs(f_fit - f_true) <= 0.1
    true_min = truth.predict(n, (1 - f_true) * d, f_true * d, bits)
    assert truth.predict(n, (1 - f_fit) * d, f_fit * d, bits) <= true_min * 1.001
    for f in (0.1, 0.3, 0.6, 0.9):
        predicted = law.predict(n, (1 - f) * d, f * d, bits)
        assert abs(predicted / truth.predict(n, (1 - f) * d, f * d, bits) - 1) <= 0.005


def test_fit_diagnostics_bootstrap_and_round_trip(fitted, tmp_path):
    truth, law, runs = fitted
    diag = law.diagnostics
    assert diag["runs"] == len(runs) and len(diag["residuals"]) == len(runs)
    assert diag["mean_abs_relative_error"] < 0.004  # the noise is 0.2 %
    lo, hi = law.predict_interval(1e8, 7e9, 3e9, 4)
    assert lo <= law.predict(1e8, 7e9, 3e9, 4) <= hi and hi - lo < 0.05
    path = law.save(tmp_path / "law.json")
    again = QATScalingLaw.load(path)
    assert again.params == law.params and again.predict(1e8, 7e9, 3e9, 4) == law.predict(1e8, 7e9, 3e9, 4)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"form": "other", "params": {}}))
    with pytest.raises(ValueError, match="not a hf_qat law file"):
        QATScalingLaw.load(bad)


def test_best_bits_under_a_memory_budget():
    truth = QATScalingLaw(TRUE)
    choice = truth.best_bits(memory_bytes=50e6, total_tokens=2e10, candidates=(1, 2, 4, 8))
    losses = {row["bits"]: row["predicted_loss"] for row in choice.candidates}
    assert choice.best["predicted_loss"] == min(losses.values())
    row4 = next(r for r in choice.candidates if r["bits"] == 4)
    assert row4["num_params"] == pytest.approx(1e8)
    assert row4["predicted_loss"] == pytest.approx(
        truth.predict(1e8, (1 - row4["qat_fraction"]) * 2e10, row4["qat_fraction"] * 2e10, 4))


def test_equivalent_fp_params_is_smaller_than_the_quantized_model():
    truth = QATScalingLaw(TRUE)
    n_fp = truth.equivalent_fp_params(1e8, 1e10, 2)
    assert 1e6 < n_fp < 1e8
    f = truth.optimal_fraction(1e8, 1e10, 2)
    assert truth.predict(n_fp, 1e10, 0, None) == pytest.approx(truth.predict(1e8, (1 - f) * 1e10, f * 1e10, 2), rel=1e-6)


def test_load_runs_from_csv_and_jsonl(tmp_path):
    _, runs = synthetic_runs()
    csv_path = tmp_path / "runs.csv"
    lines = ["num_params,fp_tokens,qat_tokens,bits,loss"]
    lines += [f"{r['num_params']},{r['fp_tokens']},{r['qat_tokens']},{'' if r['bits'] is None else r['bits']},{r['loss']}"
              for r in runs[:10]]
    csv_path.write_text("\n".join(lines) + "\n")
    jsonl = tmp_path / "runs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in runs[:10]) + "\n")
    a, b = load_runs(csv_path), load_runs(jsonl)
    np.testing.assert_allclose(a.loss, b.loss)
    assert np.isnan(a.bits[0]) and a.bits[1] == 1.0
    with pytest.raises(ValueError, match="lacks loss"):
        load_runs([{"num_params": 1, "fp_tokens": 1, "qat_tokens": 1, "bits": 4}])
    with pytest.raises(ValueError, match="bits"):
        load_runs([{"num_params": 1, "fp_tokens": 1, "qat_tokens": 1, "bits": 7, "loss": 1.0}])
