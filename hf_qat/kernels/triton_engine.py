"""The Triton engine behind ``hf_qat.kernels.dispatch``: same interface as the PyTorch reference."""

from __future__ import annotations

from .triton_activation_quant import activation_fake_quant_forward
from .triton_ggml import ggml_backward, ggml_forward
from .triton_unpack import unpack_dequantize
from .triton_weight_quant import fake_quant_backward, fake_quant_forward


class TritonEngine:
    name = "triton"

    def weight_forward(self, weight, s_r, step, spec):
        return fake_quant_forward(weight, s_r, step, spec)

    def weight_backward(self, grad_output, weight, s_r, step, spec, need_scale_grad):
        return fake_quant_backward(grad_output, weight, s_r, step, spec, need_scale_grad)

    def activation_forward(self, x):
        return activation_fake_quant_forward(x)

    def dequantize(self, packed, bits, cols, table, step, dtype):
        return unpack_dequantize(packed, bits, cols, table, step, dtype)

    def ggml_forward(self, matrix, step, minimum, grid):
        return ggml_forward(matrix, step, minimum, grid)

    def ggml_backward(self, grad_output, matrix, step, minimum, grid, need_scale_grad):
        return ggml_backward(grad_output, matrix, step, minimum, grid, need_scale_grad)
