"""Bits per weight in memory, scales included: the planner's S and best-bits' equal-memory comparison of
int4 g32, MXFP4 and NVFP4."""

from __future__ import annotations

import json
import os

import pytest

from hf_qat.cli import main
from hf_qat.planner import QATScalingLaw, plan_qat
from hf_qat.planner.storage import weight_format

LAW = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "laws", "stdlib_cpu.json")
# bits per weight: 4-bit elements plus one scale per block (E8M0: 8 bits per 32; E4M3: 8 per 16; fp16: 16 per 32)
STORAGE = {"4": 4.0, "mxfp4": 4 + 8 / 32, "nvfp4": 4 + 8 / 16, "int4-g32": 4 + 16 / 32}


def test_weight_formats_count_their_scales():
    for name, bits in STORAGE.items():
        fmt = weight_format(name)
        assert (fmt.bits, fmt.storage_bits) == (4, bits)
    assert weight_format(4, method="nvfp4").storage_bits == 4.5 and weight_format(4, method="lsq").storage_bits == 4.0
    for name, bits, storage in (("q6_k", 6, 6.5625), ("q2_k", 2, 2.625), ("q4_k", 4, 4.5), ("q5_1", 5, 6.0)):
        fmt = weight_format(name)  # a ggml family is named by itself, at its own bit width
        assert (fmt.name, fmt.bits, fmt.storage_bits) == (name, bits, storage)
    with pytest.raises(ValueError, match=r"'fp5' is not a weight format; write a bit width .* a block-scaled family \(mxfp4, nvfp4, .*q4_k, .*q6_k, .*\), or int<B>-g<G>"):
        weight_format("fp5")


@pytest.mark.parametrize("method", ["mxfp4", "nvfp4"])
def test_the_plan_counts_a_block_format_s_scales_in_tokens_per_parameter_byte(method):
    plan = plan_qat(num_params=135e6, total_tokens=10e9, bits=4, method=method, total_steps=1000)
    assert plan.storage_bits == STORAGE[method] and plan.method == method
    assert plan.tokens_per_param_byte == pytest.approx(10e9 / (135e6 * STORAGE[method] / 8), rel=1e-12)
    assert f"{method} ({STORAGE[method]:g} bits per weight with its scales)" in plan.summary()
    assert plan.to_dict()["storage_bits"] == STORAGE[method]
    plain = plan_qat(num_params=135e6, total_tokens=10e9, bits=4)
    assert plain.storage_bits == 4.0 and plain.tokens_per_param_byte > plan.tokens_per_param_byte


def test_best_bits_compares_int4_g32_mxfp4_and_nvfp4_at_equal_memory(capsys):
    law = QATScalingLaw.load(LAW)
    choice = law.best_bits(64e3, 1e6, candidates=("int4-g32", "mxfp4", "nvfp4"))
    rows = {row["format"]: row for row in choice.candidates}
    for name in ("int4-g32", "mxfp4", "nvfp4"):
        assert rows[name]["num_params"] == pytest.approx(8 * 64e3 / STORAGE[name])
        assert rows[name]["bits"] == 4
    assert rows["int4-g32"]["predicted_loss"] == rows["nvfp4"]["predicted_loss"]  # same bits per weight
    assert choice.best["format"] == "mxfp4"  # the fewest bits per weight: the most parameters at one B
    assert main(["best-bits", "--memory", "64KB", "--tokens", "1M", "--law", LAW, "--candidates", "int4-g32,mxfp4,nvfp4"]) == 0
    out = capsys.readouterr().out
    assert "best bit width for 64KB of weights and 1M tokens: mxfp4" in out and "knows no element grid" in out
    assert main(["plan", "--params", "131K", "--tokens", "1M", "--bits", "4", "--method", "nvfp4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["storage_bits"] == 4.5


def test_weight_format_names_only_formats():
    from hf_qat.planner.storage import weight_format

    for spec in ("lsq", "seq", "int4-g0", "fp4"):
        with pytest.raises(ValueError, match="is not a weight format"):
            weight_format(spec)
