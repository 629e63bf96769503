"""The scale formats of the block-scaled float families (MXFP4, NVFP4): what a learned block scale
is rounded to in the forward pass, and how a rounded scale splits into the tensors a file stores.

A block's learned scale ``s`` (fp32, clamped to at least 1e-5 before, in weight units: ``w ~ s * E2M1``)
becomes the rounded scale ``s_r`` that divides the weights and multiplies the elements:

* E8M0 (MXFP4, ``torch.float8_e8m0fnu``): ``s_r = 2^floor(log2 s)``. E8M0 stores the biased exponent
  ``127 + floor(log2 s)``; compressed-tensors' ``compress_mx_scale`` takes the same floor. With the
  first scale ``amax / 4`` this is OCP's rule ``floor(log2 amax) - 2`` (see the MXFP4 family's module).
* E4M3 (NVFP4, ``torch.float8_e4m3fn``), two levels: one power of two ``g`` per tensor, the largest with
  ``max(s) * g <= 448`` (a fused expert stack is one tensor), then per block
  ``s_b = e4m3(clamp(s * g, 2^-9, 448))`` (round to nearest even: torch's float8_e4m3fn cast) and
  ``s_r = s_b / g``. compressed-tensors stores ``weight_scale = s_b`` and ``weight_global_scale = g``
  and dequantizes ``q * (s_b / g)``. Its own rule is ``g = 448 * 6 / amax(W)``, which our ``g`` equals
  rounded down to a power of two **(our choice)**: E4M3's relative spacing does not depend on ``g``, so
  only the ends of the range move (at most one binade, at the bottom: blocks 2^15 below the largest),
  and every product of the format is then exact in fp32 and bfloat16: compressed-tensors decompresses
  in bfloat16, llama.cpp multiplies ``1 / g`` into the matmul's output, gguf-py dequantizes the blocks
  without it, and all three give the QAT weights bit for bit. ``g`` follows the largest learned scale,
  so a learned scale never saturates at 448; the clamp at 2^-9 (E4M3's smallest subnormal) keeps a
  zero block from a zero scale.

Both are computed from exponents and comparisons (``torch.frexp``, bit patterns), so they are exact on
every device; both engines share them (``reference.prepare_scales``). The step ``s_r / 2`` of a block
(E2M1 codes are doubled) is exact in bfloat16: it is a power of two, or an E4M3 value times one.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E4M3_MIN = 2.0**-9  # the smallest positive (subnormal) E4M3 value
E8M0_BIAS = 127
SCALE_DTYPES = (torch.float8_e8m0fnu, torch.float8_e4m3fn)
STEP_DTYPE = torch.bfloat16  # holds every step of both formats exactly (the native format stores steps in it)


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """``2^exponent`` in fp32, built from its bit pattern (exact; normal range)."""
    return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)


def e8m0(scale: torch.Tensor) -> torch.Tensor:
    """``2^floor(log2 s)`` of every (positive, fp32) scale."""
    _, exponent = torch.frexp(scale)  # s = m * 2^e with m in [0.5, 1): floor(log2 s) = e - 1
    return _power_of_two(exponent - 1)


def tensor_scale(scale: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor ``g``: the largest power of two with ``max(scale) * g <= 448``, fp32 ``[]``."""
    mantissa, exponent = torch.frexp(scale.max())  # max = m * 2^e; 448 = 0.875 * 2^9
    return _power_of_two(9 - exponent - (mantissa > 0.875).to(torch.int32))


def e4m3_blocks(scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The stored block scales ``s_b = e4m3(clamp(s * g, 2^-9, 448))``, float8_e4m3fn."""
    return (scale * g).clamp(E4M3_MIN, E4M3_MAX).to(torch.float8_e4m3fn)


def round_block_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """``s_r`` (fp32, shaped like ``scale``) of positive fp32 scales in one of :data:`SCALE_DTYPES`."""
    if scale_dtype == torch.float8_e8m0fnu:
        return e8m0(scale)
    g = tensor_scale(scale)
    return e4m3_blocks(scale, g).float() / g


def e8m0_exponents(s_r: torch.Tensor) -> torch.Tensor:
    """Rounded E8M0 scales -> their stored biased exponents ``127 + log2 s_r``, uint8."""
    mantissa, exponent = torch.frexp(s_r)
    if not bool((mantissa == 0.5).all()):
        raise ValueError("E8M0 scales must be powers of two")
    return (exponent - 1 + E8M0_BIAS).to(torch.uint8)


def e4m3_split(s_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounded NVFP4 scales -> ``(s_b float8_e4m3fn like s_r, g fp32 [])`` with ``s_b / g == s_r`` exactly
    (``g`` is :func:`tensor_scale` of the rounded scales: the forward's ``g`` or twice it)."""
    g = tensor_scale(s_r)
    s_b = (s_r * g).to(torch.float8_e4m3fn)
    if not torch.equal(s_b.float() / g, s_r):
        raise ValueError("the scales are not E4M3 values over one power of two")
    return s_b, g
