"""IQ4_XS: llama.cpp's 4.25-bit type, the IQ4_NL grid under two-level block scales.

A super-block of 256 weights along the input dim holds eight blocks of 32. Each weight's code is one of
IQ4_NL's 16 non-uniform levels (:data:`~.kquants.IQ4_NL_VALUES`, -127 .. 113: the nearest, ties to the even
index); each block has a learned scale ``s_j``, stored as a 6-bit integer under the super-block's fp16 ``d``:

    d      = fp16(max_j s_j / 31)
    sc_j   = clamp(round(s_j / d), 1, 31)     (the format stores -32..31; a learned scale is positive)
    value  = d * sc_j * level

so the step, the codes, the gradients and the mse search are :mod:`.kquants`' (``scale_max`` 31, no mins).
The first scale ``max|w| / 113`` clips no weight. Storage per super-block, 136 bytes (4.25 bits a weight),
ggml's ``block_iq4_xs``:

* fp16 ``d``;
* ``scales_h`` (2 bytes, little-endian): bits ``2j``, ``2j + 1`` are the top two bits of block ``j``'s
  6-bit ``sc_j + 32``;
* ``scales_l`` (4 bytes): the low four bits of ``sc_j + 32``, block ``j`` in the low nibble of byte ``j / 2``
  when ``j`` is even, else in the high one;
* 128 bytes: each block of 32 as IQ4_NL's 16 bytes (level index of element ``i`` in the low nibble of byte
  ``i``, element ``i + 16`` in the high one).

A weight whose input width is not a multiple of 256 cannot be IQ4_XS; llama.cpp's file type ``iq4_xs``
writes such a weight as IQ4_NL (blocks of 32), which ``QATConfig.from_preset("iq4_xs")`` trains.
"""

from __future__ import annotations

import torch

from .ggml_blocks import Blocks, nibbles_32
from .kquants import IQ4_NL_VALUES, GGMLGrid, ggml_family


def layout(u: torch.Tensor, b: Blocks) -> list[torch.Tensor]:
    """Level indices ``[R, S, 256]`` and the block scales -> ``d``, ``scales_h``, ``scales_l``, the codes."""
    ls = (b.sc + 32).to(torch.int64)  # [R, S, 8]: 6 bits, the format's signed scale + 32
    scales_h = sum(((ls[..., j] >> 4) & 3) << (2 * j) for j in range(8))
    scales_l = (ls[..., 0::2] & 15) | ((ls[..., 1::2] & 15) << 4)
    qs = nibbles_32(u.view(b.rows, b.supers, 8, 32))
    return [b.d, scales_h.unsqueeze(-1).view(torch.uint8)[..., :2], scales_l, qs.reshape(b.rows, b.supers, 128)]


GRID = GGMLGrid("IQ4_XS", 4, 32, -127, 113, 31, None, 4.25, layout, IQ4_NL_VALUES)
IQ4XSQuantizer = ggml_family("iq4_xs", GRID, __name__)
