"""The one dispatch point: Triton kernels for CUDA tensors, the PyTorch reference otherwise.

``HF_QAT_BACKEND=auto|triton|torch|compiled`` (read on every call) overrides the choice. Forcing ``triton``
where Triton cannot run (not installed, or a CPU tensor without ``TRITON_INTERPRET=1``) raises; it
never falls back silently. ``compiled`` is the reference compiled by TorchInductor
(:mod:`.compiled_engine`: fused passes for long CPU runs, after a compile of seconds per weight shape); the rows
an embedding looks up, whose number changes with the batch, run on the uncompiled reference there.

The autograd Functions here are the only place that calls an engine. Scale rounding before the
kernels and the scale-gradient finish after them are shared PyTorch code (``prepare_scales`` /
``finish_scale_grad``), so the engines differ only in the elementwise pass and its reductions.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Protocol

import torch

from .pack import dequantize_reference
from hf_qat.quantizers.base import MatrixView
from hf_qat.quantizers.kquants import GGMLGrid, ggml_backward_pass, ggml_forward_pass
from hf_qat.quantizers.reference import (
    WeightQuantSpec,
    fake_quantize_activation,
    fake_quantize_backward,
    fake_quantize_forward,
    finish_scale_grad,
    prepare_scales,
)

BACKENDS = ("auto", "triton", "torch", "compiled")
ENV_VAR = "HF_QAT_BACKEND"


class Engine(Protocol):
    name: str

    def weight_forward(self, weight: torch.Tensor, s_r: torch.Tensor, step: torch.Tensor,
                       spec: WeightQuantSpec) -> torch.Tensor: ...

    def weight_backward(self, grad_output: torch.Tensor, weight: torch.Tensor, s_r: torch.Tensor,
                        step: torch.Tensor, spec: WeightQuantSpec,
                        need_scale_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def activation_forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def dequantize(self, packed: torch.Tensor, bits: int, cols: int, table: torch.Tensor, step: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor: ...

    def ggml_forward(self, matrix: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor | None,
                     grid: GGMLGrid) -> torch.Tensor: ...

    def ggml_backward(self, grad_output: torch.Tensor, matrix: torch.Tensor, step: torch.Tensor,
                      minimum: torch.Tensor | None, grid: GGMLGrid,
                      need_scale_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]: ...


# Weights per slice of the reference's backward: its temporaries (the ratio, the codes, the masks) are then
# bounded by a slice, not the matrix (a 49152 x 576 embedding would need about 5 of its own size at once).
BACKWARD_SLICE = 1 << 22


def _by_rows(backward, grad_output: torch.Tensor, *per_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``backward(grad_rows, *per_row_rows) -> (grad, sums or None)`` over slices of the matrix's rows, written into
    one gradient (the math is per row: slicing changes no bit). ``per_row``: the matrix and its scales, whose
    first dim is the rows (or 1: a per-tensor scale, passed whole)."""
    rows, cols = grad_output.shape
    chunk = max(1, BACKWARD_SLICE // max(cols, 1))
    if rows <= chunk:
        return backward(grad_output, *per_row)
    grad, sums = None, []
    for start in range(0, rows, chunk):
        part = slice(start, start + chunk)
        grad_part, sums_part = backward(grad_output[part], *(t if t is None or t.shape[0] == 1 else t[part]
                                                            for t in per_row))
        if grad is None:
            grad = torch.empty((rows, cols), dtype=grad_part.dtype, device=grad_part.device)
        grad[part] = grad_part
        sums.append(sums_part)
    return grad, None if sums[0] is None else torch.cat(sums)


class TorchEngine:
    """The reference (hf_qat.quantizers.reference) as an engine; its backward runs by slices of rows."""

    name = "torch"

    def weight_forward(self, weight, s_r, step, spec):
        return fake_quantize_forward(weight, s_r, step, spec.grid, spec.layout)

    def weight_backward(self, grad_output, weight, s_r, step, spec, need_scale_grad):
        return _by_rows(lambda g, w, s, t: fake_quantize_backward(g, w, s, t, spec.grid, spec.layout, need_scale_grad),
                        grad_output, weight, s_r, step)

    def activation_forward(self, x):
        return fake_quantize_activation(x)

    def dequantize(self, packed, bits, cols, table, step, dtype):
        return dequantize_reference(packed, bits, cols, table, step, dtype)

    def ggml_forward(self, matrix, step, minimum, grid):
        return ggml_forward_pass(matrix, step, minimum, grid)

    def ggml_backward(self, grad_output, matrix, step, minimum, grid, need_scale_grad):
        return _by_rows(lambda g, m, t, mn: ggml_backward_pass(g, m, t, mn, grid, need_scale_grad),
                        grad_output, matrix, step, minimum)


_TORCH = TorchEngine()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton is installed (looked up once per process, not per call)."""
    return importlib.util.find_spec("triton") is not None


# The engines that need Triton or the compiler: imported on first use, one instance per process.
@functools.lru_cache(maxsize=None)
def _triton_engine() -> Engine:
    from .triton_engine import TritonEngine

    return TritonEngine()


@functools.lru_cache(maxsize=None)
def _compiled_engine() -> Engine:
    from .compiled_engine import CompiledEngine

    return CompiledEngine()


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    return value


def select_engine(tensor: torch.Tensor, rows_vary: bool = False) -> Engine:
    """The engine for ``tensor`` under the current ``HF_QAT_BACKEND``; ``rows_vary``: a matrix whose number of rows
    changes from call to call (an embedding's rows of one batch: few), which the compiled engine leaves to the
    reference rather than compile a kernel for every batch's shape (the same bits)."""
    backend = requested_backend()
    if backend == "torch":
        return _TORCH
    if backend == "compiled":
        # a compiled model (Trainer torch_compile=True) compiles the reference itself; rows that vary run it uncompiled
        if torch.compiler.is_compiling() or rows_vary:
            return _TORCH
        engine = _compiled_engine()
        reason = engine.refusal(tensor)
        if reason is not None:
            raise RuntimeError(f"{ENV_VAR}=compiled {reason}; or use {ENV_VAR}=torch")
        return engine
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed (pip install triton)")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{ENV_VAR}=triton but the tensor is on {tensor.device}: Triton runs CUDA tensors, or CPU "
                "tensors only under TRITON_INTERPRET=1 (slow, for tests)"
            )
        return _triton_engine()
    return _triton_engine() if tensor.is_cuda and triton_available() else _TORCH


class WeightFakeQuant(torch.autograd.Function):
    """``weight`` (stored layout), ``scale [scale shape]`` -> the fake-quantized weight (weight dtype,
    stored layout). The engines see the ``[R, C]`` matrix of ``view``; for a transposed stack that
    matrix is a contiguous copy made in each pass and never kept (only the stored weight is saved)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scale: torch.Tensor, spec: WeightQuantSpec, view: MatrixView,
                engine: Engine) -> torch.Tensor:
        s_r, step = prepare_scales(scale, spec.grid, spec.scale_dtype)
        ctx.save_for_backward(weight, scale, s_r, step)
        ctx.spec = spec
        ctx.view = view
        ctx.engine = engine
        matrix = view.to_matrix(weight).contiguous()
        return view.from_matrix(engine.weight_forward(matrix, s_r, step, spec), weight.shape)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, scale, s_r, step = ctx.saved_tensors
        spec: WeightQuantSpec = ctx.spec
        view: MatrixView = ctx.view
        need_scale_grad = bool(ctx.needs_input_grad[1]) and spec.learnable
        grad_matrix, group_sums = ctx.engine.weight_backward(
            view.to_matrix(grad_output).contiguous(), view.to_matrix(weight).contiguous(), s_r, step, spec,
            need_scale_grad,
        )
        grad_scale = finish_scale_grad(group_sums, scale, spec.grad_scale) if need_scale_grad else None
        grad_weight = view.from_matrix(grad_matrix, weight.shape) if ctx.needs_input_grad[0] else None
        return grad_weight, grad_scale, None, None, None


class ActivationFakeQuant(torch.autograd.Function):
    """int8 per-token fake quantization with the straight-through (identity) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return select_engine(x).activation_forward(x.contiguous())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output


def weight_fake_quant(weight: torch.Tensor, scale: torch.Tensor, spec: WeightQuantSpec,
                      view: MatrixView = MatrixView(), rows_vary: bool = False) -> torch.Tensor:
    """Differentiable weight fake quantization through the selected engine (``view``: how ``weight``
    is seen as the matrix of the math; a 2-D weight is its own; ``rows_vary``: rows looked up from a table,
    whose number changes from call to call, see :func:`select_engine`). A family with a forward of its own
    (``spec.forward``, :meth:`~hf_qat.quantizers.family.Quantizer.own_forward`: ggml's blocks) is served by it,
    with the engine chosen here for its per-weight passes."""
    engine = select_engine(weight, rows_vary)
    if spec.forward is not None:
        matrix = view.to_matrix(weight)
        return view.from_matrix(spec.forward(matrix, scale, spec.grad_scale, engine), weight.shape)
    return WeightFakeQuant.apply(weight, scale, spec, view, engine)


def dequantize_packed(packed: torch.Tensor, bits: int, cols: int, table: torch.Tensor, step: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """A packed low-bit weight (``kernels.pack`` layout) as a dense ``[rows, cols]`` tensor of ``dtype``."""
    return select_engine(packed).dequantize(packed, bits, cols, table, step, dtype)


def activation_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Differentiable int8 per-token activation fake quantization through the selected engine."""
    return ActivationFakeQuant.apply(x)
