"""Triton kernel for int8 per-token dynamic activation fake quantization (forward; the backward is
the identity). Bit for bit ``hf_qat.quantizers.reference.fake_quantize_activation``:

    a = reciprocal(max(max|x|, 1e-5)) * 127;  x_q = clamp(round(x * a), -128, 127) / a

One program per token row, two passes over it: the absolute maximum (exact in any order), then
quantization. Divisions are IEEE (``div_rn``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_weight_quant import OUT_KINDS, _clamp, _round_half_even, _to_out_dtype


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _activation_fq_kernel(x_ptr, out_ptr, D, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    peak = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + cols, mask=cols < D, other=0.0).to(tl.float32)
        peak = _max_keeping_nan(peak, tl.abs(x))
    m = _max_keeping_nan(tl.reduce(peak, 0, _max_keeping_nan), 1e-5)  # a NaN in the row: a NaN row, as torch's amax
    scale = tl.math.div_rn(1.0, m) * 127.0
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + cols, mask=cols < D, other=0.0).to(tl.float32)
        q = _clamp(_round_half_even(x * scale), -128.0, 127.0)
        tl.store(out_ptr + base + cols, _to_out_dtype(tl.math.div_rn(q, scale), OUT_KIND), mask=cols < D)


def activation_fake_quant_forward(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` (contiguous) -> its int8 per-token fake quantization, same dtype and shape."""
    d = x.shape[-1]
    rows = x.numel() // d
    out = torch.empty_like(x)
    block = min(4096, triton.next_power_of_2(d))
    _activation_fq_kernel[(rows,)](x, out, d, OUT_KIND=OUT_KINDS[x.dtype], BLOCK=block, enable_fp_fusion=False)
    return out
