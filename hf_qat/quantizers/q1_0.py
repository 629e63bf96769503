"""Q1_0: llama.cpp's 1-bit blocks (``block_q1_0``) as a QAT family.

A block is 128 weights along the input dim and one fp16 scale ``d``; a weight is ``+d`` or ``-d``
(ggml-quants.c ``dequantize_row_q1_0``): 18 bytes per block, 1.125 bits per weight. The grid is the binary
family's (:mod:`.binary`: code ``sign(r)``, +1 at 0), with the block fixed at 128 and the scale rounded to
fp16, so the QAT forward is ``fp16(s) * code`` exactly what llama.cpp dequantizes. The first scale is the
block's ``mean|w|``, llama.cpp's own reference quantizer's ``d`` (``quantize_row_q1_0_ref``).

GGUF layout, per block: ``d`` (fp16, little-endian), then 16 bytes; bit ``i`` of byte ``j`` is element
``8j + i``, 1 for ``+d`` and 0 for ``-d``. docs/architecture.md has the recipe this module follows.
"""

from __future__ import annotations

import numpy as np
import torch

from .binary import BinaryQuantizer
from .registry import register_quantizer

QK1_0 = 128  # weights per block


@register_quantizer("q1_0")
class Q10Quantizer(BinaryQuantizer):
    """ggml's Q1_0 (see the module docstring)."""

    block_size = QK1_0
    scale_dtype = torch.float16
    llama_cpp_types = {"Q1_0": (1, QK1_0)}

    def gguf_type(self, group_size: int | str, scale_dtype: torch.dtype, ternary_type: str) -> str:
        return "Q1_0"

    def pack_gguf(self, codes: torch.Tensor, step: torch.Tensor, block_scales, qtype: str | None = None) -> np.ndarray:
        """``codes [R, C]`` in {-1, +1} and their fp16-exact steps ``[R, C / 128]`` -> ``uint8 [R, 18 C / 128]``."""
        rows, cols = codes.shape
        bits = (codes > 0).to(torch.int32).view(rows, cols // QK1_0, QK1_0 // 8, 8)
        qs = sum(bits[..., i] << i for i in range(8)).to(torch.uint8)
        d = step.to(torch.float16).contiguous().view(torch.uint8).view(rows, cols // QK1_0, 2)
        return torch.cat([d, qs], dim=-1).reshape(rows, -1).numpy()
