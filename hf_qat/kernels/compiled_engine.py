"""The compiled engine behind ``hf_qat.kernels.dispatch`` (``HF_QAT_BACKEND=compiled``): the PyTorch reference's
per-weight passes compiled by TorchInductor, for long runs on a CPU.

Eager PyTorch runs the reference one operation at a time: a table grid's forward (MXFP4, NVFP4, IQ4_NL) makes
about a dozen passes over the weight, each writing a weight-sized temporary. Compiled, each pass is one fused
loop that reads the weight once and writes only its result; the math is the reference's own code, traced
whole (``fullgraph``: a break would be an error, never a silent eager piece), so the results are the
reference's bit for bit (tests/kernels/test_compiled_engine.py checks every kind of grid, ties, -0.0,
subnormals and NaN included). Two inductor settings could change bits and are pinned off here, whatever the
process set: floating-point contraction (an FMA in ``code * level - r``) and unsafe math (reordered sums,
reciprocal division). A weight's kernel is compiled for its shape and dtype the first time it is met (about
1 to 6 s on 2 cores; a kernel for any shape runs 3 to 20 times slower on a CPU), so the engine pays off in runs
of more than a few dozen steps. CPU tensors only (on CUDA the Triton kernels are hf_qat's; inductor's own
would divide approximately), TorchInductor needs a C++ compiler, and the torch whose compiled code the suite
checks: the dispatch refuses otherwise. The block scales are rounded in PyTorch before the passes, as for
every engine.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import types

import torch

from .pack import dequantize_reference
from hf_qat.quantizers.kquants import ggml_backward_pass, ggml_forward_pass
from hf_qat.quantizers.reference import fake_quantize_activation, fake_quantize_backward, fake_quantize_forward

# The options that keep inductor's C++ to IEEE single operations in the reference's order.
EXACT = {"cpp.enable_floating_point_contract_flag": "off", "cpp.enable_unsafe_math_opt_flag": False}
# The oldest torch whose compiled passes the suite has checked bit for bit.
MIN_TORCH = (2, 13)
TORCH_CHECKED = torch.torch_version.TorchVersion(torch.__version__) >= MIN_TORCH


def cxx_compiler() -> str:
    """The C++ compiler TorchInductor will call: ``$CXX``, else g++ (clang++ on macOS)."""
    return os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")


@functools.lru_cache(maxsize=None)
def cxx_available() -> bool:
    """Whether :func:`cxx_compiler` is on the PATH (looked up once per process)."""
    return shutil.which(cxx_compiler()) is not None


@functools.lru_cache(maxsize=None)
def kernel(fn, static: tuple, shape: tuple[int, ...] | None, dtype: torch.dtype):
    """``fn(*tensors, *static)`` compiled as a function of its tensors of one ``dtype``, for a weight of one
    ``shape`` or, ``shape`` None, for any shape (activations, whose shape changes with the batch). Each is a code
    object of its own, so dynamo's recompile limit (8 per code object) never sends a model with many shapes
    back to eager."""

    def run(*tensors):
        return fn(*tensors, *static)

    code = run.__code__.replace(co_name=f"compiled_{fn.__name__}")  # a new code object, named for profiles
    copy = types.FunctionType(code, run.__globals__, code.co_name, None, run.__closure__)
    return torch.compile(copy, dynamic=shape is None, fullgraph=True, options=EXACT)


def _detached(*tensors):
    """The tensors without autograd's flags (None kept), so a frozen and a trained weight share a kernel."""
    return tuple(t if t is None else t.detach() for t in tensors)


class CompiledEngine:
    name = "compiled"

    def refusal(self, tensor: torch.Tensor) -> str | None:
        """Why this engine cannot serve ``tensor`` here (None: it can)."""
        if tensor.device.type != "cpu":
            return f"runs CPU tensors, and this one is on {tensor.device} (there, use auto or triton)"
        if not TORCH_CHECKED:
            return (f"needs torch >= {'.'.join(map(str, MIN_TORCH))} (its compiled passes are checked bit for bit "
                    f"there), and this is torch {torch.__version__}")
        if not cxx_available():
            return (f"needs a C++ compiler on a CPU (TorchInductor builds its kernels with one) and found no "
                    f"{cxx_compiler()} on the PATH: install it, or set CXX to a C++ compiler")
        return None

    def weight_forward(self, weight, s_r, step, spec):
        return kernel(fake_quantize_forward, (spec.grid, spec.layout), weight.shape, weight.dtype)(
            *_detached(weight, s_r, step))

    def weight_backward(self, grad_output, weight, s_r, step, spec, need_scale_grad):
        # the whole matrix at once: the row slices of the reference engine bound its eager temporaries, which
        # the compiled pass does not make
        return kernel(fake_quantize_backward, (spec.grid, spec.layout, need_scale_grad), weight.shape,
                      weight.dtype)(*_detached(grad_output, weight, s_r, step))

    def activation_forward(self, x):
        """One kernel for every activation of a dtype: seen as ``[tokens, features]``, dynamic."""
        flat = x.reshape(-1, x.shape[-1]).detach()  # detached last: not a view of a 3-D base, which dynamo guards on
        return kernel(fake_quantize_activation, (), None, x.dtype)(flat).reshape(x.shape)

    def dequantize(self, packed, bits, cols, table, step, dtype):
        return dequantize_reference(packed, bits, cols, table, step, dtype)

    def ggml_forward(self, matrix, step, minimum, grid):
        return kernel(ggml_forward_pass, (grid,), matrix.shape, matrix.dtype)(*_detached(matrix, step, minimum))

    def ggml_backward(self, grad_output, matrix, step, minimum, grid, need_scale_grad):
        return kernel(ggml_backward_pass, (grid, need_scale_grad), matrix.shape, matrix.dtype)(
            *_detached(grad_output, matrix, step, minimum))
