"""Non-finite weights and activations through the Triton kernels: the same results as the PyTorch reference.

A ratio ``r = w / s`` that is NaN keeps NaN through an integer grid's clamp and rounding, takes a table grid's
last level (E2M1's 6, IQ4_NL's 113) and has its weight gradient stopped wherever a mask applies; +-inf clip to
the grid's ends. Triton's ``minimum`` / ``maximum`` return the other operand for a NaN by default (on CUDA and in
the interpreter), and ``x > midpoint`` is false for a NaN: both would put a NaN weight on the bottom level instead.
A NaN's payload is not compared, except that a bf16 NaN must stay a NaN (:func:`test_bf16_cast_of_any_nan`)."""

from __future__ import annotations

import pytest
import torch

from hf_qat.config import TERNARY_BITS
from hf_qat.kernels.dispatch import TorchEngine
from hf_qat.quantizers import ScaleLayout, get_quantizer
from hf_qat.quantizers.kquants import GRIDS, block_scales, ggml_backward_pass, ggml_forward_pass
from hf_qat.quantizers.reference import WeightQuantSpec, prepare_scales
from helpers import assert_same

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from hf_qat.kernels.triton_engine import TritonEngine  # noqa: E402
from hf_qat.kernels.triton_ggml import ggml_backward, ggml_forward  # noqa: E402
from hf_qat.kernels.triton_weight_quant import _to_out_dtype  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NONFINITE = (float("nan"), float("inf"), -float("inf"), -float("nan"))
FAMILIES = [("binary", 1, 32), ("seq", TERNARY_BITS, 32), ("seq", 2, 32), ("lsq", 2, 32), ("lsq", 4, 32),
            ("lsq", 8, 32), ("absmax", 4, 32), ("mxfp4", 4, 32), ("nvfp4", 4, 16)]


def poison(weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Put each non-finite value in three random places."""
    weight = weight.clone()
    flat = weight.view(-1)
    places = torch.randperm(flat.numel(), generator=gen)[:3 * len(NONFINITE)]
    for k, place in enumerate(places.tolist()):
        flat[place] = NONFINITE[k % len(NONFINITE)]
    return weight


@pytest.mark.parametrize("family,bits,group", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_families(family, bits, group, dtype):
    gen = torch.Generator().manual_seed(3)
    rows, cols = 6, 4 * group
    quantizer = get_quantizer(family, bits)
    clean = torch.randn(rows, cols, generator=gen) * 0.05
    scale = quantizer.init_scale(ScaleLayout(group).scale_view(clean))
    spec = WeightQuantSpec(quantizer.grid(), group, getattr(quantizer, "scale_dtype", torch.float16),
                           quantizer.grad_scale(clean.numel(), scale.numel(), "paretoq"), quantizer.learnable)
    weight = poison(clean, gen).to(dtype).to(DEVICE)
    grad = torch.randn(rows, cols, generator=gen).to(dtype).to(DEVICE)
    s_r, step = prepare_scales(scale.to(DEVICE), spec.grid, spec.scale_dtype)
    ref, tri = TorchEngine(), TritonEngine()
    want = ref.weight_forward(weight, s_r, step, spec)
    assert_same(tri.weight_forward(weight, s_r, step, spec), want)
    if spec.grid.magnitudes:  # a NaN ratio takes E2M1's top level, the sign of a NaN is not negative
        assert torch.isnan(weight).any() and not torch.isnan(want).any()
    for need_scale_grad in (spec.learnable, False):
        gw_ref, sums_ref = ref.weight_backward(grad, weight, s_r, step, spec, need_scale_grad)
        gw_tri, sums_tri = tri.weight_backward(grad, weight, s_r, step, spec, need_scale_grad)
        assert_same(gw_tri, gw_ref)
        if need_scale_grad:
            assert_same(sums_tri, sums_ref)


@pytest.mark.parametrize("name", sorted(GRIDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ggml_types(name, dtype):
    grid = GRIDS[name]
    gen = torch.Generator().manual_seed(4)
    rows, cols = 5, max(grid.super_block, 256)
    clean = torch.randn(rows, cols, generator=gen) * 0.05
    blocks = clean.reshape(rows, cols // grid.block, grid.block)
    if grid.asymmetric:
        m = (-blocks.amin(-1)).clamp_min(1e-5)
        scale = torch.stack([(blocks.amax(-1) + m) / grid.hi, m], -1)
    else:
        scale = blocks.abs().amax(-1).clamp_min(1e-5) / grid.hi
    scales = block_scales(scale.to(DEVICE), grid)
    weight = poison(clean, gen).to(dtype).to(DEVICE)
    grad = torch.randn(rows, cols, generator=gen).to(dtype).to(DEVICE)
    want = ggml_forward_pass(weight, scales.step, scales.min, grid)
    assert_same(ggml_forward(weight, scales.step, scales.min, grid), want)
    if grid.values:  # a NaN ratio takes the table's last level
        assert torch.isnan(weight).any() and not torch.isnan(want).any()
    want_weight, want_sums = ggml_backward_pass(grad, weight, scales.step, scales.min, grid, True)
    got_weight, got_sums = ggml_backward(grad, weight, scales.step, scales.min, grid, True)
    assert_same(got_weight, want_weight)
    assert_same(got_sums, want_sums)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_activations(dtype):
    """A NaN or infinite activation makes its token's row NaN, as torch's amax does (wider than a block: 5000)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5000, generator=gen)
    x[1, 4500], x[2, 7], x[3, 100], x[4, 4999] = float("nan"), float("inf"), -float("inf"), -float("nan")
    x = x.to(dtype).to(DEVICE)
    want = TorchEngine().activation_forward(x)
    assert torch.isnan(want[1:5]).all() and not torch.isnan(want[[0, 5]]).any()
    assert_same(TritonEngine().activation_forward(x), want)


@triton.jit
def _cast_to_bf16(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, _to_out_dtype(tl.load(x_ptr + offs), 2))


def test_bf16_cast_of_any_nan():
    """The kernels' fp32 -> bf16 rounding (carry into the upper half) on NaNs of every payload: CUDA's 0x7FFFFFFF
    would carry into the sign and come out -0.0; the interpreter's own NaN (0x7FC00000) would not show it."""
    payloads = [0x7FFFFFFF, 0x7FFF8000, 0x7FC00000, 0xFFFFFFFF, 0xFFC00000, 0x7F800001, 0x3F800000, 0x7F800000]
    x = torch.tensor(payloads, dtype=torch.int64).to(torch.int32).view(torch.float32).to(DEVICE)
    out = torch.empty(len(payloads), dtype=torch.bfloat16, device=DEVICE)
    _cast_to_bf16[(1,)](x, out, N=len(payloads))
    assert_same(out, x.to(torch.bfloat16))  # six NaNs, 1.0 and +inf
