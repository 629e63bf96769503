"""Binary (1-bit) weights, ParetoQ (arXiv 2502.02631): w_q = s * sign(w).

sign(0) is taken as +1 **(our choice)**, so every weight lies on the two-level grid; first scale
mean|w|; the weight gradient passes where |r| <= 1; scale-gradient factor sign(w); g uses Qp_int = 1.
"""

from __future__ import annotations

import torch

from .base import Grid
from .family import Quantizer
from .registry import register_quantizer


@register_quantizer("binary")
class BinaryQuantizer(Quantizer):
    supported_bits = (1,)

    def grid(self) -> Grid:
        return Grid(
            sign=True, clip_lo=-1.0, clip_hi=1.0, mul=1.0, add=0.0, code_mul=1, code_add=0,
            level=1.0, grad_lo=-1.0, grad_hi=1.0, mask_lo=-1.0, mask_hi=1.0, qp_int=1,
        )

    def init_scale(self, groups: torch.Tensor) -> torch.Tensor:
        return groups.abs().mean(dim=-1)
