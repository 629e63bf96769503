"""SEQ (stretched elastic quantization, ParetoQ arXiv 2502.02631) for ternary and 2 bits.

ternary: w_q = s * round(clip(r, -c, c) * 1.5) / 1.5, levels {-2/3, 0, 2/3} (codes -1, 0, 1 with
         step 2s/3 rounded to the scale dtype);
2-bit:   w_q = s * (round(clip(r, -c, c) * 2 - 0.5) + 0.5) / 2, levels {+-1/4, +-3/4} (odd codes
         -3, -1, 1, 3 with step s/4).
c = 0.99; first scale max|w|; the weight gradient passes where |r| <= c; scale-gradient factor
-Qp' / +Qp' where clipped (Qp' = 1.0 ternary, 0.75 2-bit), q(r) - r inside; g uses Qp_int = 1.
"""

from __future__ import annotations

import torch

from ..bits import TERNARY_BITS
from .base import SEQ_CLIP, Grid
from .family import Quantizer
from .registry import register_quantizer

# fp32(2/3): the ternary level spacing in units of s.
TERNARY_LEVEL = float(torch.tensor(2.0 / 3.0, dtype=torch.float32))


@register_quantizer("seq")
class SEQQuantizer(Quantizer):
    supported_bits = (TERNARY_BITS, 2)
    llama_cpp_types = {"TQ1_0": (TERNARY_BITS, 256), "TQ2_0": (TERNARY_BITS, 256)}

    def grid(self) -> Grid:
        c = SEQ_CLIP
        if self.bits == TERNARY_BITS:
            return Grid(
                sign=False, clip_lo=-c, clip_hi=c, mul=1.5, add=0.0, code_mul=1, code_add=0,
                level=TERNARY_LEVEL, grad_lo=-1.0, grad_hi=1.0, mask_lo=-c, mask_hi=c, qp_int=1,
            )
        return Grid(
            sign=False, clip_lo=-c, clip_hi=c, mul=2.0, add=-0.5, code_mul=2, code_add=1,
            level=0.25, grad_lo=-0.75, grad_hi=0.75, mask_lo=-c, mask_hi=c, qp_int=1,
        )

    def init_scale(self, groups: torch.Tensor) -> torch.Tensor:
        return groups.abs().amax(dim=-1)
