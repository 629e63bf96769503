"""Triton kernel: unpack a b-bit little-endian bitstream and dequantize through a code table.

Bit for bit ``hf_qat.kernels.pack.dequantize_reference``. A value may straddle two bytes (3, 5, 6
bits), so each one reads bytes ``k`` and ``k + 1`` of its row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_weight_quant import OUT_KINDS, _to_out_dtype


@triton.jit
def _unpack_dequant_kernel(packed_ptr, table_ptr, step_ptr, out_ptr, R, C, row_bytes, GROUP_W, step_row_stride,
                           BITS: tl.constexpr, OUT_KIND: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)  # int64 offsets past 2^31 elements
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    bitpos = cols * BITS
    byte = bitpos // 8
    shift = bitpos % 8
    base = packed_ptr + rows[:, None] * row_bytes
    lo = tl.load(base + byte[None, :], mask=mask, other=0).to(tl.int32)
    hi = tl.load(base + byte[None, :] + 1, mask=mask & (byte[None, :] + 1 < row_bytes), other=0).to(tl.int32)
    u = ((lo | (hi << 8)) >> shift[None, :]) & ((1 << BITS) - 1)
    code = tl.load(table_ptr + u, mask=mask, other=0.0)
    step = tl.load(step_ptr + rows[:, None] * step_row_stride + cols[None, :] // GROUP_W, mask=mask, other=0.0)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], _to_out_dtype(code * step, OUT_KIND), mask=mask)


def unpack_dequantize(packed: torch.Tensor, bits: int, cols: int, table: torch.Tensor, step: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    rows = packed.shape[0]
    out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
    step32 = step.float().contiguous()
    step_row_stride = step32.shape[1] if step32.shape[0] == rows else 0
    br, bc = 16, 128
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
    _unpack_dequant_kernel[grid](
        packed.contiguous(), table.float().contiguous(), step32, out, rows, cols, packed.shape[1],
        cols // step32.shape[1], step_row_stride, BITS=bits, OUT_KIND=OUT_KINDS[dtype], BR=br, BC=bc,
        enable_fp_fusion=False,
    )
    return out
