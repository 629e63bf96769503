"""The compiled engine (``HF_QAT_BACKEND=compiled``: the reference compiled by TorchInductor) against the reference
engine, bit for bit: every kind of grid (integer, sign, SEQ, E2M1 lookups with both block-scale formats, ggml's
blocks with and without mins, IQ4_NL's table), ties, -0.0, NaN and clipped weights, and a training run."""

from __future__ import annotations

import pytest
import torch

import hf_qat
from hf_qat import QATConfig
from hf_qat.config import TERNARY_BITS
from hf_qat.kernels import compiled_engine
from hf_qat.kernels.compiled_engine import CompiledEngine
from hf_qat.kernels.dispatch import TorchEngine, select_engine
from hf_qat.quantizers import ScaleLayout, get_quantizer
from hf_qat.quantizers.kquants import GRIDS, block_scales
from hf_qat.quantizers.reference import WeightQuantSpec, finish_scale_grad, prepare_scales
from helpers import assert_same, bits_of, qat_trained_model, tiny_llama

REF, COMPILED = TorchEngine(), CompiledEngine()
needs_cxx = pytest.mark.skipif(COMPILED.refusal(torch.zeros(1)) is not None,
                               reason="no C++ compiler for TorchInductor, or an older torch than the engine's")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def hard_weight(rows: int, cols: int, s_r: torch.Tensor, ties: torch.Tensor, dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with the first row's start set to ``ties`` times its scale (exact ties of the grid, -0.0,
    values past the clip range), subnormals, one NaN and one outlier."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    weight[0, :len(ties)] = ties * s_r.reshape(-1)[0]
    weight[1, :4] = torch.tensor([1e-39, -1e-39, 1e-44, -0.0])  # fp32 subnormals: no flush to zero
    weight[-1, -1] = float("nan")
    weight[-1, 0] = 3.0
    return weight.to(dtype)


def hard_grad(rows: int, cols: int, dtype, gen) -> torch.Tensor:
    grad = torch.randn(rows, cols, generator=gen)
    grad[1, :8] = torch.tensor([1e-39, -1e-39, 3e-40, 1e-45, -1e-45, 0.0, -0.0, 1e-38])
    return grad.to(dtype)


# (family, bits, group): the integer LSQ grid, absmax (no scale gradient), SEQ ternary and 2-bit (no zero level),
# the sign grid, and E2M1 with E8M0 and E4M3 block scales (the table lookup)
GRID_CASES = [("lsq", 4, 32), ("absmax", 4, "channel"), ("seq", TERNARY_BITS, "tensor"), ("seq", 2, 16),
              ("binary", 1, "channel"), ("mxfp4", 4, 32), ("nvfp4", 4, 16)]
TIES = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -1.75, -5.0, -8.0, 0.0, -0.0, 0.5, -6.5])


@needs_cxx
@pytest.mark.parametrize("family,bits,group", GRID_CASES, ids=lambda v: str(v))
def test_grid_passes_are_the_reference_bit_for_bit(family, bits, group):
    rows, cols = 9, 96
    quantizer = get_quantizer(family, bits)
    layout = ScaleLayout(group)
    probe = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)) * 0.05
    gen = torch.Generator().manual_seed(2)
    scale = quantizer.init_scale(layout.scale_view(probe))
    scale = scale * (0.6 + 0.8 * torch.rand(scale.shape, generator=gen))  # some weights clip, some do not
    spec = WeightQuantSpec(quantizer.grid(), group, quantizer.scale_dtype or torch.float16,
                           quantizer.grad_scale(probe.numel(), scale.numel(), "paretoq"), quantizer.learnable)
    s_r, step = prepare_scales(scale, spec.grid, spec.scale_dtype)
    graphs_before = graphs()
    for dtype in DTYPES:
        weight = hard_weight(rows, cols, s_r, TIES, dtype)
        grad = hard_grad(rows, cols, dtype, gen)
        assert_same(COMPILED.weight_forward(weight, s_r, step, spec), REF.weight_forward(weight, s_r, step, spec))
        for need_scale_grad in {False, spec.learnable}:
            got = COMPILED.weight_backward(grad, weight, s_r, step, spec, need_scale_grad)
            want = REF.weight_backward(grad, weight, s_r, step, spec, need_scale_grad)
            assert_same(got[0], want[0])
            assert_same(got[1], want[1])
            if need_scale_grad:
                assert_same(finish_scale_grad(got[1], scale, spec.grad_scale),
                            finish_scale_grad(want[1], scale, spec.grad_scale))
        if spec.grid.mask_lo != -float("inf"):  # absmax passes every gradient
            stopped = REF.weight_backward(grad, weight, s_r, step, spec, False)[0] == 0
            assert stopped.any() and not stopped.all()  # both sides of the straight-through mask are reached
    assert graphs() > graphs_before  # the compiled code ran (a cached kernel from an earlier test would not count)


@needs_cxx
@pytest.mark.parametrize("name", ["q4_k", "q6_k", "iq4_nl", "q4_1"])
def test_ggml_passes_are_the_reference_bit_for_bit(name):
    """Symmetric and asymmetric blocks, super-blocks and IQ4_NL's table, with weights on the ties of the grid."""
    grid = GRIDS[name]
    rows, cols = 5, 256
    gen = torch.Generator().manual_seed(3)
    probe = torch.randn(rows, cols, generator=gen) * 0.05
    scale = get_quantizer(name, grid.bits).init_scale(ScaleLayout(grid.block).scale_view(probe))
    scale = scale * (0.6 + 0.8 * torch.rand(scale.shape, generator=gen))
    scales = block_scales(scale, grid)
    levels = torch.tensor(grid.values, dtype=torch.float32) if grid.values else torch.arange(grid.lo, grid.hi + 1.0)
    ties = torch.cat([(levels[1:] + levels[:-1]) / 2, torch.tensor([-0.0, grid.hi + 3.0, grid.lo - 3.0])])
    minimum = scales.min.reshape(-1)[0] if grid.asymmetric else 0.0
    for dtype in DTYPES:
        weight = hard_weight(rows, cols, scales.step, ties, torch.float32)
        weight[0, :len(ties)] -= minimum
        weight = weight.to(dtype)
        grad = hard_grad(rows, cols, dtype, gen)
        assert_same(COMPILED.ggml_forward(weight, scales.step, scales.min, grid),
                    REF.ggml_forward(weight, scales.step, scales.min, grid))
        for need_scale_grad in (False, True):
            got = COMPILED.ggml_backward(grad, weight, scales.step, scales.min, grid, need_scale_grad)
            want = REF.ggml_backward(grad, weight, scales.step, scales.min, grid, need_scale_grad)
            assert_same(got[0], want[0])
            assert_same(got[1], want[1])


@needs_cxx
def test_activations_of_any_shape_share_one_kernel_and_are_the_reference():
    gen = torch.Generator().manual_seed(4)
    torch._dynamo.reset()
    compiled_engine.kernel.cache_clear()
    before = graphs()
    for shape in [(2, 7, 48), (3, 5, 48), (4, 33)]:
        x = torch.randn(shape, generator=gen) * 3
        x[0, 0] = 0.0
        x[0, 1] = -0.0
        x[1, 0] = float("nan")  # its row is NaN, as in the reference
        assert_same(COMPILED.activation_forward(x), REF.activation_forward(x))
    assert graphs() - before == 1  # one dynamic kernel for every shape


@needs_cxx
def test_each_weight_shape_gets_a_kernel_of_its_own_that_runs_compiled():
    """A model has many weight shapes; each shape's kernel is a code object of its own, so none of them runs
    into dynamo's recompile limit (8 per code object) and silently falls back to eager."""
    quantizer = get_quantizer("lsq", 3)
    spec = WeightQuantSpec(quantizer.grid(), 8, torch.float32, 1.0)
    before = graphs()
    compiled_before = compiled_engine.kernel.cache_info().currsize
    for cols in range(8, 8 * 12, 8):  # 11 shapes of one family and dtype
        weight = torch.randn(3, cols)
        scale = quantizer.init_scale(ScaleLayout(8).scale_view(weight))
        s_r, step = prepare_scales(scale, spec.grid, spec.scale_dtype)
        assert_same(COMPILED.weight_forward(weight, s_r, step, spec), REF.weight_forward(weight, s_r, step, spec))
    assert compiled_engine.kernel.cache_info().currsize - compiled_before == 11
    assert graphs() - before == 11  # every shape traced and compiled, none left eager


@needs_cxx
def test_the_dispatch_serves_the_compiled_engine_on_request(monkeypatch):
    monkeypatch.setenv("HF_QAT_BACKEND", "compiled")
    assert select_engine(torch.zeros(1)).name == "compiled"
    monkeypatch.setenv("HF_QAT_BACKEND", "auto")
    assert select_engine(torch.zeros(1)).name == "torch"  # never chosen unasked: its compile takes seconds


@needs_cxx
@pytest.mark.parametrize("cfg", [dict(bits=4, method="mxfp4", activation_bits=8), dict(bits=4, method="iq4_nl"),
                                 dict(bits="ternary", group_size="tensor", embedding_bits=4)],
                         ids=["mxfp4-a8", "iq4_nl", "ternary-embedding"])
def test_a_training_run_ends_with_the_weights_of_the_reference(cfg, monkeypatch):
    results = {}
    for backend in ("torch", "compiled"):
        monkeypatch.setenv("HF_QAT_BACKEND", backend)
        results[backend] = qat_trained_model(QATConfig(start=0, **cfg)).state_dict()
    for name, value in results["torch"].items():
        assert torch.equal(value.view(torch.uint8), results["compiled"][name].view(torch.uint8)), name
    scales = [k for k in results["torch"] if k.endswith("log_scale_ratio")]
    assert scales and any(bool(results["torch"][k].abs().max() > 0) for k in scales)  # training moved them


@needs_cxx
def test_inside_a_compiled_function_the_dispatch_leaves_the_reference_to_the_outer_compile(monkeypatch):
    monkeypatch.setenv("HF_QAT_BACKEND", "compiled")

    def engine_code(t):
        return t + (1.0 if select_engine(t).name == "torch" else 2.0)

    assert engine_code(torch.zeros(1)).item() == 2.0  # eager: the compiled engine
    assert torch.compile(engine_code, backend="eager", fullgraph=True)(torch.zeros(1)).item() == 1.0


@needs_cxx
def test_a_model_compiled_whole_with_the_engine_requested_trains_as_eager(monkeypatch):
    """The Trainer's torch_compile=True with HF_QAT_BACKEND=compiled: the same loss and gradients as eager (parts
    that dynamo leaves eager, past its recompile limit, run the engine; the rest is traced from the reference)."""
    results = {}
    for backend, compile_model in (("torch", False), ("compiled", True)):
        monkeypatch.setenv("HF_QAT_BACKEND", backend)
        model = tiny_llama()
        hf_qat.prepare_model_for_qat(model, QATConfig(start=0, bits=4, method="mxfp4"))
        hf_qat.activate_qat(model)
        run = torch.compile(model, backend="aot_eager") if compile_model else model
        batch = torch.arange(32).reshape(2, 16)
        loss = run(input_ids=batch, labels=batch).loss
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert torch.allclose(results["torch"][0], results["compiled"][0], atol=1e-6)
    for want, got in zip(results["torch"][1], results["compiled"][1], strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_without_a_cxx_compiler_the_request_is_refused_with_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_QAT_BACKEND", "compiled")
    monkeypatch.setattr(compiled_engine, "TORCH_CHECKED", True)
    monkeypatch.setattr(compiled_engine, "cxx_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"HF_QAT_BACKEND=compiled needs a C\+\+ compiler.*found no "
                                           r"\S+ on the PATH: install it, or set CXX.*HF_QAT_BACKEND=torch"):
        select_engine(torch.zeros(1))
    monkeypatch.setattr(compiled_engine, "TORCH_CHECKED", False)
    with pytest.raises(RuntimeError, match=r"HF_QAT_BACKEND=compiled needs torch >= 2\.13"):
        select_engine(torch.zeros(1))


def test_a_tensor_off_the_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("HF_QAT_BACKEND", "compiled")
    with pytest.raises(RuntimeError, match=r"HF_QAT_BACKEND=compiled runs CPU tensors, and this one is on meta"):
        select_engine(torch.zeros(1, device="meta"))
