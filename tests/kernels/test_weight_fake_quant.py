"""Triton kernels against the PyTorch reference, bit for bit (interpreted on CPU, compiled on GPU)."""

from __future__ import annotations

import pytest
import torch

from hf_qat.config import TERNARY_BITS
from hf_qat.kernels.dispatch import TorchEngine, weight_fake_quant
from hf_qat.quantizers import ScaleLayout, get_quantizer
from hf_qat.quantizers.reference import WeightQuantSpec, finish_scale_grad, prepare_scales
from helpers import bits_of

triton = pytest.importorskip("triton")
from hf_qat.kernels.triton_engine import TritonEngine  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAMILIES = [("binary", 1), ("seq", TERNARY_BITS), ("seq", 2), ("lsq", 2), ("lsq", 3), ("lsq", 4), ("lsq", 8),
            ("absmax", 4)]
# (rows, cols, group): odd row counts, widths that are not powers of two, tiles that do not divide.
SHAPES = [(5, 96, 32), (7, 48, 16), (3, 200, "channel"), (9, 72, "tensor"), (6, 1536, 512), (4, 40, 8),
          (33, 1100, "channel")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def case(family, bits, rows, cols, group, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=gen) * 0.05)
    weight[0, 1] = 0.5
    weight[-1, -1] = 0.0
    weight = weight.to(dtype)
    quantizer = get_quantizer(family, bits)
    layout = ScaleLayout(group)
    scale = quantizer.init_scale(layout.scale_view(weight.float()))
    scale = (scale * (0.6 + 0.8 * torch.rand(scale.shape, generator=gen))).to(dtype)
    spec = WeightQuantSpec(quantizer.grid(), group, torch.float16 if dtype != torch.bfloat16 else torch.bfloat16,
                           quantizer.grad_scale(weight.numel(), scale.numel(), "paretoq"), quantizer.learnable)
    grad = (torch.randn(rows, cols, generator=gen)).to(dtype)
    return weight.to(DEVICE), scale.to(DEVICE), grad.to(DEVICE), spec


@pytest.mark.parametrize("family,bits", FAMILIES)
@pytest.mark.parametrize("rows,cols,group", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_both_gradients_are_bit_exact(family, bits, rows, cols, group, dtype):
    weight, scale, grad, spec = case(family, bits, rows, cols, group, dtype)
    s_r, step = prepare_scales(scale, spec.grid, spec.scale_dtype)
    ref, tri = TorchEngine(), TritonEngine()
    assert torch.equal(bits_of(tri.weight_forward(weight, s_r, step, spec)), bits_of(ref.weight_forward(weight, s_r, step, spec)))
    gw_ref, sums_ref = ref.weight_backward(grad, weight, s_r, step, spec, spec.learnable)
    gw_tri, sums_tri = tri.weight_backward(grad, weight, s_r, step, spec, spec.learnable)
    assert torch.equal(bits_of(gw_tri), bits_of(gw_ref))
    if spec.learnable:
        gs_ref = finish_scale_grad(sums_ref, scale, spec.grad_scale)
        gs_tri = finish_scale_grad(sums_tri, scale, spec.grad_scale)
        assert torch.equal(bits_of(gs_tri), bits_of(gs_ref))
    else:
        assert sums_ref is None and sums_tri is None


@pytest.mark.parametrize("shape", [(3, 7, 48), (5, 5000), (1, 33), (2, 4, 1536)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activation_fake_quant_is_bit_exact(shape, dtype):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype).to(DEVICE)
    x.view(-1)[0] = 0.0
    ref = TorchEngine().activation_forward(x)
    tri = TritonEngine().activation_forward(x)
    assert torch.equal(bits_of(tri), bits_of(ref))
    zero_row = torch.zeros(2, 16, dtype=dtype, device=DEVICE)  # the 1e-5 clamp
    assert torch.equal(bits_of(TritonEngine().activation_forward(zero_row)), bits_of(TorchEngine().activation_forward(zero_row)))


@pytest.mark.parametrize("group", [16, "channel", "tensor"])
@pytest.mark.parametrize("transposed", [False, True], ids=["stored-out-in", "stored-in-out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_stack_of_expert_matrices_is_bit_exact_through_the_dispatch(group, transposed, dtype, monkeypatch):
    """A fused expert stack [E, out, in] (or [E, in, out]) goes through WeightFakeQuant as its matrix
    view: Triton and the reference agree bit for bit on the output and on both gradients."""
    from hf_qat.model.unit import WeightQuantizer

    gen = torch.Generator().manual_seed(4)
    shape = (3, 48, 24) if transposed else (3, 24, 48)
    stack = (torch.randn(shape, generator=gen) * 0.05).to(dtype).to(DEVICE)
    unit = WeightQuantizer(get_quantizer("lsq", 4), stack, group_size=group, scale_dtype="float16",
                           scale_grad_mode="paretoq", name="experts.gate_up_proj", transposed=transposed).to(DEVICE)
    unit.initialize(stack)
    grad = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    assert_engines_agree_on_a_stack(unit, stack, grad, monkeypatch)
    assert unit.quantized(stack).shape == shape


@pytest.mark.parametrize("family,block", [("mxfp4", 32), ("nvfp4", 16)])
@pytest.mark.parametrize("rows,blocks", [(5, 3), (33, 7), (4, 40)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp4_families_are_bit_exact(family, block, rows, blocks, dtype):
    """E2M1 with E8M0 / E4M3 block scales: forward and both gradients, with every tie between elements
    and values past 6 placed exactly in the first row."""
    cols = block * blocks
    gen = torch.Generator().manual_seed(7)
    quantizer = get_quantizer(family, 4)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    layout = ScaleLayout(block)
    scale = quantizer.init_scale(layout.scale_view(weight)) * (0.6 + 0.8 * torch.rand(rows, blocks, generator=gen))
    spec = WeightQuantSpec(quantizer.grid(), block, quantizer.scale_dtype,
                           quantizer.grad_scale(weight.numel(), scale.numel(), "paretoq"))
    s_r, step = prepare_scales(scale, spec.grid, spec.scale_dtype)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -1.75, -5.0, -8.0, 0.0, -0.0, 6.0, -6.0])
    weight[0, :16] = ties * s_r[0, 0]
    weight, scale = weight.to(dtype).to(DEVICE), scale.to(DEVICE)
    s_r, step = prepare_scales(scale, spec.grid, spec.scale_dtype)
    grad = torch.randn(rows, cols, generator=gen).to(dtype).to(DEVICE)
    ref, tri = TorchEngine(), TritonEngine()
    assert torch.equal(bits_of(tri.weight_forward(weight, s_r, step, spec)), bits_of(ref.weight_forward(weight, s_r, step, spec)))
    gw_ref, sums_ref = ref.weight_backward(grad, weight, s_r, step, spec, True)
    gw_tri, sums_tri = tri.weight_backward(grad, weight, s_r, step, spec, True)
    assert torch.equal(bits_of(gw_tri), bits_of(gw_ref))
    assert torch.equal(bits_of(finish_scale_grad(sums_tri, scale, spec.grad_scale)),
                       bits_of(finish_scale_grad(sums_ref, scale, spec.grad_scale)))


@pytest.mark.parametrize("family", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("transposed", [False, True], ids=["stored-out-in", "stored-in-out"])
def test_fp4_expert_stacks_are_bit_exact_through_the_dispatch(family, transposed, monkeypatch):
    from hf_qat.model.unit import WeightQuantizer

    gen = torch.Generator().manual_seed(5)
    shape = (3, 64, 32) if transposed else (3, 32, 64)
    stack = (torch.randn(shape, generator=gen) * 0.05).to(torch.bfloat16).to(DEVICE)
    quantizer = get_quantizer(family, 4)
    unit = WeightQuantizer(quantizer, stack, group_size=quantizer.block_size, scale_dtype="float16",
                           scale_grad_mode="paretoq", name="experts.gate_up_proj", transposed=transposed).to(DEVICE)
    unit.initialize(stack)
    grad = torch.randn(shape, generator=gen).to(torch.bfloat16).to(DEVICE)
    assert_engines_agree_on_a_stack(unit, stack, grad, monkeypatch)
    assert unit.quantized(stack).shape == shape


def assert_engines_agree_on_a_stack(unit, stack, grad, monkeypatch):
    """The reference and the Triton kernel on an expert stack: output, weight and scale gradients bit for
    bit, and the output is the unit's quantized stack."""
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("HF_QAT_BACKEND", backend)
        weight = stack.clone().requires_grad_(True)
        unit.zero_grad()
        out = weight_fake_quant(weight, unit.scale(weight), unit.spec, unit.view)
        out.backward(grad)
        results[backend] = (out.detach(), weight.grad, unit.log_scale_ratio.grad.clone())
    for ref, tri in zip(results["torch"], results["triton"]):
        assert torch.equal(bits_of(tri), bits_of(ref))
    assert torch.equal(results["torch"][0], unit.quantized(stack))
