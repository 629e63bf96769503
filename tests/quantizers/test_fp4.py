"""MXFP4 and NVFP4 against an independent restatement of their specification (the OCP MX spec and NVIDIA's NVFP4).

The slow versions work block by block with Python floats and numpy: the E2M1 element set written out,
round to the nearest element with ties to the one whose mantissa bit is 0, E8M0 scales as powers of two
found by halving/doubling, E4M3 as the list of every positive E4M3FN value. They share no code with
hf_qat.quantizers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_qat
from hf_qat import PRESETS, QATConfig, QATConfigError
from hf_qat.quantizers import ScaleLayout, get_quantizer
from hf_qat.quantizers.reference import WeightQuantSpec, fake_quantize_weight, prepare_scales, quantize_codes
from helpers import tiny_llama, tiny_moe

# E2M1: sign, 2 exponent bits, 1 mantissa bit. Encoding i (0..7) has the value below; even i = mantissa bit 0.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
# Every positive E4M3FN value: subnormals m / 8 * 2^-6, normals (1 + m / 8) * 2^(e - 7), up to 448.
E4M3 = sorted({m / 8 * 2.0**-6 for m in range(1, 8)} | {(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16)
                                                         for m in range(8) if (e, m) != (15, 7)})


def slow_e2m1(x: float) -> float:
    """Nearest E2M1 element to x (clamped to +-6), ties to the even encoding."""
    a = min(abs(x), 6.0)
    best = min(range(8), key=lambda i: (abs(E2M1[i] - a), i % 2))
    return float(np.copysign(E2M1[best], x))


def slow_pow2_floor(s: float) -> float:
    p = 1.0
    while p > s:
        p /= 2
    while p * 2 <= s:
        p *= 2
    return p


def slow_e4m3(x: float) -> float:
    """Round to nearest E4M3 (ties to the even mantissa), clamped to [2^-9, 448]."""
    x = min(max(x, E4M3[0]), 448.0)
    below = max(v for v in E4M3 if v <= x)
    above = min(v for v in E4M3 if v >= x)
    if x - below != above - x:
        return below if x - below < above - x else above
    mantissa = lambda v: round(v / slow_pow2_floor(v) * 8) % 8 if v >= 2.0**-6 else round(v * 2**9)  # noqa: E731
    return below if mantissa(below) % 2 == 0 else above


def slow_scales(family: str, s: np.ndarray) -> np.ndarray:
    """The rounded block scales of one tensor's learned scales s (> 0)."""
    if family == "mxfp4":
        return np.vectorize(slow_pow2_floor)(s)
    g = 1.0
    while s.max() * g > 448:
        g /= 2
    while s.max() * g * 2 <= 448:
        g *= 2
    return np.vectorize(lambda v: slow_e4m3(v * g) / g)(s)


def weights_with_ties(rows: int, cols: int, block: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights and first scales, with every E2M1 midpoint (and beyond 6) placed exactly in row 0."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    scale = (w.abs().reshape(rows, -1, block).amax(-1) / 6) * (0.7 + 0.6 * torch.rand(rows, cols // block, generator=gen))
    return w, scale


@pytest.mark.parametrize("family,block", [("mxfp4", 32), ("nvfp4", 16)])
def test_forward_equals_the_slow_specification(family, block):
    quantizer = get_quantizer(family, 4)
    w, scale = weights_with_ties(6, 4 * block, block)
    spec = WeightQuantSpec(quantizer.grid(), block, quantizer.scale_dtype, 1.0)
    s_r = prepare_scales(scale, spec.grid, spec.scale_dtype)[0]
    # row 0: the ties between elements, exactly: r = midpoint, and values past 6
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -9.0]
    w[0, :len(ties)] = torch.tensor(ties) * s_r[0, 0]
    want_s = slow_scales(family, scale.double().numpy())
    assert np.array_equal(s_r.double().numpy(), want_s)
    got = fake_quantize_weight(w, scale, spec)
    s_cols = np.repeat(want_s, block, axis=1)
    want = np.vectorize(slow_e2m1)(w.numpy().astype(np.float32) / s_cols.astype(np.float32)) * s_cols
    assert np.array_equal(got.double().numpy(), want)
    assert got[0, :8].div(s_r[0, 0]).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]  # ties to the even element
    codes, step = quantize_codes(w, scale, spec)
    assert torch.equal(codes.float() * step.repeat_interleave(block, 1), got)
    assert set(codes.unique().tolist()) <= {-12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12}


def test_first_scales_are_ocp_for_mxfp4_and_amax_over_6_for_nvfp4():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    amax32 = w.abs().reshape(4, 2, 32).amax(-1)
    mx = get_quantizer("mxfp4", 4)
    s = mx.init_scale(ScaleLayout(32).scale_view(w))
    s_r = prepare_scales(s, mx.grid(), mx.scale_dtype)[0]
    assert torch.equal(s_r, 2.0 ** (torch.floor(torch.log2(amax32)) - 2))  # OCP MX 1.0's rule
    nv = get_quantizer("nvfp4", 4)
    assert torch.equal(nv.init_scale(ScaleLayout(16).scale_view(w)), w.abs().reshape(4, 4, 16).amax(-1) / 6)
    zero_block = torch.zeros(2, 16)
    s_r = prepare_scales(nv.init_scale(ScaleLayout(16).scale_view(zero_block)), nv.grid(), nv.scale_dtype)[0]
    assert bool((s_r > 0).all())  # the 1e-5 clamp and E4M3's smallest subnormal: no zero scale


def test_nvfp4_tensor_scale_follows_the_largest_learned_scale():
    from hf_qat.quantizers.block_scales import e4m3_split

    nv = get_quantizer("nvfp4", 4)
    scale = torch.tensor([[1e-3, 2e-2], [5e-1, 3e-4]])
    s_r = prepare_scales(scale, nv.grid(), nv.scale_dtype)[0]
    assert torch.equal(s_r, torch.tensor(slow_scales("nvfp4", scale.double().numpy()), dtype=torch.float32))
    s_b, g = e4m3_split(s_r)  # what a file stores: E4M3 block scales over one power of two
    assert float(g) == 512.0  # the largest power of two with 0.5 * g <= 448
    assert torch.equal(s_b.float() / g, s_r) and float(s_b.float().max()) == 256.0
    grown = prepare_scales(scale * 8, nv.grid(), nv.scale_dtype)[0]  # a learned scale grows: g follows, no saturation
    assert torch.equal(grown, s_r * 8)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="mxfp4", group_size=16), r"group_size=16 .*allowed: 32 with method='mxfp4' \(its format's block\)"),
    (dict(method="nvfp4", group_size=32), r"group_size=32 .*allowed: 16 with method='nvfp4' \(its format's block\)"),
    (dict(method="nvfp4", group_size="channel"), r"group_size='channel' .*allowed: 16 with method='nvfp4'"),
    (dict(method="mxfp4", bits=8), r"bits=8 .*allowed: 4 with method='mxfp4'"),
    (dict(method="nvfp4", bits=2), r"bits=2 .*allowed: 4 with method='nvfp4'"),
    (dict(method="mxfp4", scale_dtype="bfloat16"), r"scale_dtype='bfloat16' .*'float16' \(the default\) with 'mxfp4'"),
    (dict(method="mxfp4", embedding_bits=4, embedding_method="nvfp4"),
     r"group_size=32 .*allowed: 16 with embedding_method='nvfp4'"),
])
def test_bad_group_size_bits_and_scale_dtype_are_refused_naming_the_block(kwargs, message):
    with pytest.raises(QATConfigError, match=message):
        QATConfig(**{"bits": 4, **kwargs})


def test_presets_and_defaults_take_the_format_block():
    assert QATConfig(bits=4, method="mxfp4").group_size == 32
    assert QATConfig(bits=4, method="nvfp4").group_size == 16
    assert QATConfig().group_size == 32
    for name, block in (("mxfp4", 32), ("nvfp4", 16)):
        cfg = QATConfig.from_preset(name)
        assert (cfg.resolved_method, cfg.group_size) == (name, block) and PRESETS[name]["bits"] == 4
        assert QATConfig.from_dict(cfg.to_dict()) == cfg
    # an integer-family embedding keeps the configured scale dtype and takes the block as its group
    assert QATConfig(bits=4, method="nvfp4", embedding_bits=4, scale_dtype="float32").group_size == 16


@pytest.mark.parametrize("family", ["mxfp4", "nvfp4"])
def test_units_on_a_linear_a_tied_embedding_and_an_expert_stack(family):
    model = tiny_llama(tie=True, hidden=64)
    hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, method=family, start=0, embedding_bits=4,
                                                  embedding_method=family))
    hf_qat.activate_qat(model)
    assert model.lm_head.weight_quantizer is model.model.embed_tokens.weight_quantizer
    block = 32 if family == "mxfp4" else 16
    unit = model.model.layers[0].mlp.down_proj.weight_quantizer
    assert unit.spec.scale_dtype == get_quantizer(family, 4).scale_dtype
    assert tuple(unit.init_scale.shape) == (64, 128 // block)
    x = torch.randint(0, 64, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    assert unit.log_scale_ratio.grad is not None and bool(unit.log_scale_ratio.grad.abs().sum() > 0)
    moe = tiny_moe("qwen3_moe", moe_intermediate_size=32)
    hf_qat.prepare_model_for_qat(moe, QATConfig(bits=4, method=family, start=0))
    hf_qat.activate_qat(moe)
    experts = moe.model.layers[0].mlp.experts
    stack = experts.down_proj  # [E, H, I]: blocks along each expert's input I
    stack_unit = experts.down_proj_quantizer
    assert tuple(stack_unit.init_scale.shape) == (stack.shape[0] * stack.shape[1], stack.shape[2] // block)
    quantized = stack_unit.quantized(stack)
    for e in range(stack.shape[0]):  # each expert's block scales come from its own rows
        first = get_quantizer(family, 4).init_scale(ScaleLayout(block).scale_view(stack[e].detach().float()))
        rows = slice(e * stack.shape[1], (e + 1) * stack.shape[1])
        assert torch.equal(stack_unit.init_scale[rows], first)
    assert quantized.shape == stack.shape


def test_a_width_that_is_not_a_multiple_of_the_block_is_named():
    from hf_qat.errors import QATModelError

    with pytest.raises(QATModelError, match=r"mlp.experts.down_proj: its input width 16 is not a multiple of mxfp4's "
                                            r"block of 32 weights; exclude it with exclude_modules"):
        hf_qat.prepare_model_for_qat(tiny_moe("qwen3_moe"), QATConfig(bits=4, method="mxfp4", start=0))


def test_a_block_scaled_embedding_beside_integer_weights_is_refused():
    """One group_size serves weights and embeddings: an NVFP4 embedding would turn the integer weights'
    groups of 32 into groups of 16 without a word."""
    with pytest.raises(QATConfigError, match="embedding_method='nvfp4'") as info:
        QATConfig(bits=4, embedding_bits=4, embedding_method="nvfp4")
    assert info.value.field == "embedding_method"
    assert QATConfig(bits=4, method="nvfp4", embedding_bits=4).group_size == 16  # the weights' block serves both
