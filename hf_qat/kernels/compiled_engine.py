"""The compiled engine behind ``hf_qat.kernels.dispatch`` (``HF_QAT_BACKEND=compiled``): the PyTorch reference's
per-weight passes compiled by TorchInductor, for long runs on a CPU.

Eager PyTorch runs the reference one operation at a time: a table grid's forward (MXFP4, NVFP4, IQ4_NL) makes
about a dozen passes over the weight, each writing a weight-sized temporary. Compiled, each pass is one fused
loop that reads the weight once and writes only its result; the math is the reference's own code, traced,
so the results are the reference's bit for bit (tests/kernels/test_compiled_engine.py checks every kind of
grid, ties, -0.0 and NaN included). The price is the compile: some seconds per family and dtype the first
time a weight of that family is seen in a process (shapes are compiled once, dynamic), which a run of a few
hundred steps pays back. TorchInductor needs a C++ compiler on a CPU; without one the first call raises.
The block scales are rounded in PyTorch before the passes, as for every engine.
"""

from __future__ import annotations

import functools
import types
import warnings

import torch

from .pack import dequantize_reference
from hf_qat.quantizers.kquants import ggml_backward_pass, ggml_forward_pass
from hf_qat.quantizers.reference import fake_quantize_activation, fake_quantize_backward, fake_quantize_forward


@functools.lru_cache(maxsize=None)
def kernel(fn, static: tuple, shape: tuple[int, ...] | None, dtype: torch.dtype):
    """``fn(*tensors, *static)`` compiled as a function of its tensors of one ``dtype``, for a weight of one
    ``shape`` (a weight's kernel for any shape runs 3 to 20 times slower on a CPU) or, ``shape`` None, for
    any shape (activations, whose shape changes with the batch). Each is a code object of its own, so dynamo's
    recompile limit (8 per code object) never sends a model with many shapes back to eager."""

    def run(*tensors):
        return fn(*tensors, *static)

    code = run.__code__.replace(co_name=f"compiled_{fn.__name__}")  # a new code object, named for profiles
    copy = types.FunctionType(code, run.__globals__, code.co_name, None, run.__closure__)
    compiled = torch.compile(copy, dynamic=shape is None)

    def call(*tensors):
        with warnings.catch_warnings():
            # dynamo traces through the reference's lru_cache of lookup tables (a pure function of the table),
            # and says once that a cache might hide state: it hides none
            warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
            return compiled(*tensors)

    return call


class CompiledEngine:
    name = "compiled"

    def weight_forward(self, weight, s_r, step, spec):
        return kernel(fake_quantize_forward, (spec.grid, spec.layout), weight.shape, weight.dtype)(weight, s_r, step)

    def weight_backward(self, grad_output, weight, s_r, step, spec, need_scale_grad):
        return kernel(fake_quantize_backward, (spec.grid, spec.layout, need_scale_grad), weight.shape,
                      weight.dtype)(grad_output, weight, s_r, step)

    def activation_forward(self, x):
        return kernel(fake_quantize_activation, (), None, x.dtype)(x)

    def dequantize(self, packed, bits, cols, table, step, dtype):
        return dequantize_reference(packed, bits, cols, table, step, dtype)

    def ggml_forward(self, matrix, step, minimum, grid):
        return kernel(ggml_forward_pass, (grid,), matrix.shape, matrix.dtype)(matrix, step, minimum)

    def ggml_backward(self, grad_output, matrix, step, minimum, grid, need_scale_grad):
        return kernel(ggml_backward_pass, (grid, need_scale_grad), matrix.shape, matrix.dtype)(
            grad_output, matrix, step, minimum)
