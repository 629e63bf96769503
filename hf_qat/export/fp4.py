"""What the block-scaled FP4 formats store of a layer: 4-bit E2M1 encodings and the
block scales, split from the QAT codes and steps without re-quantizing.

* An element: the doubled E2M1 code ``c`` (-12..12, ``hf_qat.quantizers.e2m1_grid``) is stored as 4 bits,
  bit 3 the sign and bits 0-2 the index of ``|c|`` in 0, 1, 2, 3, 4, 6, 8, 12. compressed-tensors'
  ``unpack_fp4_from_uint8`` and ggml's ``kvalues_fp4`` (index ``i < 8``: +table[i], else -table[i - 8])
  read the same encoding; a zero code is stored as +0.
* A block scale: the rounded scale ``s_r = 2 * step`` (E2M1 codes are doubled) as an E8M0 biased exponent
  (MXFP4) or as an E4M3 value over one power-of-two per-tensor scale (NVFP4), exactly
  (:mod:`hf_qat.quantizers.block_scales`).
"""

from __future__ import annotations

import torch

from ..quantizers.base import E2M1_DOUBLED
from ..quantizers.block_scales import e4m3_split, e8m0_exponents
from .layers import QuantizedLayer

MXFP4 = torch.float8_e8m0fnu  # the scale dtype that names each format (QuantizedLayer.scale_dtype)
NVFP4 = torch.float8_e4m3fn


def is_fp4(layer: QuantizedLayer) -> bool:
    """Whether ``layer`` is on the E2M1 grid with an MXFP4 or NVFP4 scale format."""
    return layer.scale_dtype in (MXFP4, NVFP4) and layer.grid.magnitudes == E2M1_DOUBLED


def e2m1_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Doubled E2M1 codes (any integer dtype or integral float) -> their 4-bit encodings, uint8, same shape."""
    index = torch.full((max(E2M1_DOUBLED) + 1,), -1, dtype=torch.int64)
    index[list(E2M1_DOUBLED)] = torch.arange(len(E2M1_DOUBLED))
    c = codes.to(torch.int64)
    magnitude = index[c.abs().clamp(max=max(E2M1_DOUBLED))]
    if bool((magnitude < 0).any()) or bool((c.abs() > max(E2M1_DOUBLED)).any()):
        raise ValueError("codes must be doubled E2M1 values (0, 1, 2, 3, 4, 6, 8, 12 and negatives)")
    return (magnitude | ((c < 0).to(torch.int64) << 3)).to(torch.uint8)


def stored_scales(scale_dtype: torch.dtype, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(stored block scales shaped like step, per-tensor scale fp32 [] or None)`` of the steps of one
    tensor (a layer's, or a whole expert stack's) of an FP4 layer with scale dtype ``scale_dtype``:
    MXFP4 uint8 E8M0 exponents and None; NVFP4 float8_e4m3fn ``s_b`` and ``g`` with ``s_b / g == 2 * step``
    exactly (the rounded scale is twice the step: E2M1 codes are doubled)."""
    s_r = step.float() * 2
    if scale_dtype == MXFP4:
        return e8m0_exponents(s_r), None
    return e4m3_split(s_r)
