"""The reference quantizers against a slow, independent restatement of the quantizers' formulas.

The slow version works weight by weight with numpy float32 scalars, straight from the table in
their formulas; it shares no code with hf_qat.quantizers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_qat.config import TERNARY_BITS
from hf_qat.kernels import weight_fake_quant
from hf_qat.quantizers import ScaleLayout, get_quantizer
from hf_qat.quantizers.reference import (
    WeightQuantSpec,
    fake_quantize_activation,
    MSE_SCALE_RATIOS,
    fake_quantize_weight,
    mse_scale,
    quantize_codes,
    tree_sum,
)

F32 = np.float32
C = F32(0.99)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

CASES = [("binary", 1), ("seq", TERNARY_BITS), ("seq", 2)] + [("lsq", b) for b in (2, 3, 4, 5, 6, 8)] + [
    ("absmax", 4), ("absmax", 8)
]
GROUPS = [8, "channel", "tensor"]


def to_dtype_f32(x: float, dtype: torch.dtype) -> F32:
    return F32(torch.tensor(float(x), dtype=torch.float32).to(dtype).float().item())


def slow_step(family: str, bits, s_r: F32, dtype: torch.dtype) -> F32:
    if family == "seq" and bits == TERNARY_BITS:
        return to_dtype_f32(s_r * F32(2.0 / 3.0), dtype)
    if family == "seq":
        return to_dtype_f32(s_r * F32(0.25), dtype)
    return s_r


def slow_forward(family: str, bits, w: F32, s_r: F32, step: F32) -> F32:
    r = F32(w) / s_r
    if family == "binary":
        return step * F32(1.0 if w >= 0 else -1.0)
    if family in ("lsq", "absmax"):
        qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return step * F32(np.clip(np.round(r), qn, qp))
    rc = F32(min(max(r, -C), C))
    if bits == TERNARY_BITS:
        return step * F32(np.round(rc * F32(1.5)))
    q = F32(np.round(rc * F32(2.0) - F32(0.5)))
    return step * (F32(2.0) * q + F32(1.0))


def slow_grads(family: str, bits, w: F32, s_r: F32, g: F32) -> tuple[F32, float]:
    """(weight-gradient contribution, scale-gradient contribution before g) for one weight."""
    r = F32(w) / s_r
    if family == "binary":
        return (g if abs(r) <= 1 else F32(0)), float(g) * (1.0 if w >= 0 else -1.0)
    if family in ("lsq", "absmax"):
        qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if family == "absmax":
            return g, 0.0
        inside = qn <= r <= qp
        factor = qn if r < qn else qp if r > qp else float(F32(np.round(r)) - r)
        return (g if inside else F32(0)), float(g) * factor
    qp_prime = 1.0 if bits == TERNARY_BITS else 0.75
    inside = abs(r) <= C
    if r < -C:
        factor = -qp_prime
    elif r > C:
        factor = qp_prime
    elif bits == TERNARY_BITS:
        factor = float(F32(np.round(r * F32(1.5))) / F32(1.5) - r)
    else:
        factor = float((F32(np.round(r * F32(2.0) - F32(0.5))) + F32(0.5)) / F32(2.0) - r)
    return (g if inside else F32(0)), float(g) * factor


def make_case(family, bits, group, dtype_name, seed=0, rows=5, cols=32):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    weight[0, 3] = 0.4  # an outlier, so some groups clip
    weight[1, 0] = 0.0  # sign(0)
    quantizer = get_quantizer(family, bits)
    layout = ScaleLayout(group)
    scale = quantizer.init_scale(layout.scale_view(weight))
    scale = scale * (0.6 + 0.8 * torch.rand(scale.shape, generator=gen))  # move off the max: both clip sides
    spec = WeightQuantSpec(quantizer.grid(), group, DTYPES[dtype_name],
                           quantizer.grad_scale(weight.numel(), scale.numel(), "paretoq"), quantizer.learnable)
    return quantizer, layout, weight, scale, spec


def expand_scale(values: torch.Tensor, layout: ScaleLayout, weight: torch.Tensor) -> torch.Tensor:
    """Per-weight copy of a per-scale tensor."""
    rows_s, groups = values.shape
    per = weight.shape[1] // groups
    out = values.repeat_interleave(per, dim=1)
    return out.expand(weight.shape[0], -1) if rows_s == 1 else out


@pytest.mark.parametrize("family,bits", CASES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_forward_matches_slow_formula_and_lies_on_grid(family, bits, group, dtype_name):
    quantizer, layout, weight, scale, spec = make_case(family, bits, group, dtype_name)
    out = fake_quantize_weight(weight, scale, spec)
    codes, step = quantize_codes(weight, scale, spec)

    s_r_full = expand_scale(scale.float().clamp(min=1e-5).to(DTYPES[dtype_name]).float(), layout, weight)
    expected = torch.empty_like(weight)
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            s_r = F32(s_r_full[i, j].item())
            step_ij = slow_step(family, bits, s_r, DTYPES[dtype_name])
            expected[i, j] = float(slow_forward(family, bits, F32(weight[i, j].item()), s_r, step_ij))
    assert torch.equal(out, expected)

    # On the grid: every output is step * code with code in the family's code set, exactly.
    assert set(codes.unique().tolist()) <= set(spec.grid.codes)
    assert torch.equal(codes.float() * expand_scale(step, layout, weight), out)
    if family == "seq" and bits == 2:
        assert set(spec.grid.codes) == {-3, -1, 1, 3}
    if family == "seq" and bits == TERNARY_BITS:
        assert set(spec.grid.codes) == {-1, 0, 1}
    if family == "binary":
        assert set(codes.unique().tolist()) == {-1, 1}


@pytest.mark.parametrize("family,bits", CASES)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype_name", ["float16", "float32"])
def test_gradients_match_slow_formula(family, bits, group, dtype_name):
    quantizer, layout, weight, scale, spec = make_case(family, bits, group, dtype_name, seed=3)
    w = weight.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(quantizer.learnable)
    grad_out = torch.randn(weight.shape, generator=torch.Generator().manual_seed(7))
    weight_fake_quant(w, s, spec).backward(grad_out)

    s_r_full = expand_scale(scale.float().clamp(min=1e-5).to(DTYPES[dtype_name]).float(), layout, weight)
    expected_gw = torch.empty_like(weight)
    sums = torch.zeros(scale.shape, dtype=torch.float64)
    magnitudes = torch.zeros(scale.shape, dtype=torch.float64)
    rows_s, groups = scale.shape
    per = weight.shape[1] // groups
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            gw, gs = slow_grads(family, bits, F32(weight[i, j].item()), F32(s_r_full[i, j].item()),
                                F32(grad_out[i, j].item()))
            expected_gw[i, j] = float(gw)
            sums[0 if rows_s == 1 else i, j // per] += gs
            magnitudes[0 if rows_s == 1 else i, j // per] += abs(gs)
    assert torch.equal(w.grad, expected_gw)
    if not quantizer.learnable:
        assert s.grad is None
        return
    qp_int = 2 ** (bits - 1) - 1 if family == "lsq" else 1
    g = 1.0 / math.sqrt(weight.numel() * qp_int)
    # The reference accumulates in fp32 (a tree), the slow version in float64: allow fp32 rounding of
    # the accumulation (a few ulps of the sum of magnitudes) plus the final rounding to the scale dtype.
    bound = (4 * 2.0**-24 * magnitudes + sums.abs() * 2.0**-23) * g + 1e-12
    assert bool(((s.grad.double() - sums * g).abs() <= bound).all()), (s.grad, sums * g)


def test_lsq_mode_scale_gradient_uses_weights_per_scale():
    quantizer = get_quantizer("lsq", 4)
    assert quantizer.grad_scale(1024, 32, "paretoq") == pytest.approx(1 / math.sqrt(1024 * 7))
    assert quantizer.grad_scale(1024, 32, "lsq") == pytest.approx(1 / math.sqrt(32 * 7))


def test_scale_is_clamped_and_rounded_in_forward():
    quantizer = get_quantizer("lsq", 4)
    spec = WeightQuantSpec(quantizer.grid(), "tensor", torch.float16, 1.0)
    weight = torch.full((2, 4), 3e-5)
    tiny = torch.full((1, 1), 1e-9, requires_grad=True)
    out = weight_fake_quant(weight, tiny, spec)
    s_r = torch.tensor(1e-5).to(torch.float16).float()
    assert torch.equal(out, (torch.round(weight / s_r).clamp(-8, 7) * s_r))
    out.sum().backward()
    assert torch.equal(tiny.grad, torch.zeros_like(tiny))  # the clamp is active: no gradient
    odd = torch.full((1, 1), 0.1003, requires_grad=True)
    codes, step = quantize_codes(weight * 1000, odd, spec)
    assert step.item() == torch.tensor(0.1003).to(torch.float16).item()


def test_tree_sum_is_the_documented_pairwise_order_and_is_hierarchical():
    x = torch.tensor([1e8, 1.0, -1e8, 1.0, 3.0], dtype=torch.float32)
    # ((1e8 + 1) + (-1e8 + 1)) + ((3 + 0) + (0 + 0))
    a = (torch.tensor(1e8) + 1.0) + (torch.tensor(-1e8) + 1.0)
    assert tree_sum(x).item() == (a + 3.0).item()
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(7, 1000, generator=gen) * torch.logspace(-4, 4, 1000)
    padded = torch.nn.functional.pad(y, (0, 24))
    blocks = tree_sum(padded.view(7, 8, 128), dim=-1)
    assert torch.equal(tree_sum(blocks, dim=-1), tree_sum(y, dim=-1))
    assert tree_sum(y, dim=0, keepdim=True).shape == (1, 1000)


def test_activation_fake_quant_is_int8_per_token():
    x = torch.randn(3, 5, 16) * 4
    out = fake_quantize_activation(x)
    scale = 127.0 / x.abs().amax(-1, keepdim=True)
    codes = out * scale
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.abs().max() <= 127.0 + 1e-3
    assert out.dtype == x.dtype and out.shape == x.shape
    bf = x.to(torch.bfloat16)
    assert fake_quantize_activation(bf).dtype == torch.bfloat16


@pytest.mark.parametrize("family,bits", [("binary", 1), ("seq", TERNARY_BITS), ("seq", 2), ("lsq", 2), ("lsq", 4)])
@pytest.mark.parametrize("group", GROUPS)
def test_mse_scale_is_the_least_error_clipping_ratio_of_each_group(family, bits, group):
    quantizer, layout, weight, _, spec = make_case(family, bits, group, "float16", seed=3)
    first = quantizer.init_scale(layout.scale_view(weight))
    chosen = mse_scale(weight, first, spec)
    # restated: every ratio's error per scale with the slow elementwise formula, the first least one wins
    w = weight.numpy().astype(F32)
    for index in np.ndindex(*first.shape):
        errors = []
        for ratio in MSE_SCALE_RATIOS:
            s_r = to_dtype_f32(max(float(first[index]) * ratio, 1e-5), DTYPES["float16"])
            step = slow_step(family, bits, s_r, DTYPES["float16"])
            covered = layout.scale_view(torch.from_numpy(w))[index].numpy()
            errors.append(sum(float(slow_forward(family, bits, x, s_r, step) - x) ** 2 for x in covered))
        best = int(np.argmin(errors))  # argmin returns the first of equal minima: ties keep the larger ratio
        assert float(chosen[index]) == pytest.approx(float(first[index]) * MSE_SCALE_RATIOS[best], rel=1e-6)
        assert errors[best] <= errors[0]


def test_mse_scale_lowers_4_bit_error_on_gaussian_weights():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    quantizer = get_quantizer("lsq", 4)
    spec = WeightQuantSpec(quantizer.grid(), 32, torch.float16, 1.0)
    first = quantizer.init_scale(ScaleLayout(32).scale_view(weight))
    error = lambda s: float((fake_quantize_weight(weight, s, spec) - weight).pow(2).sum())  # noqa: E731
    assert error(mse_scale(weight, first, spec)) < 0.9 * error(first)
