"""absmax: the non-learnable round-to-nearest baseline (and, applied once, the PTQ baseline).

The scale is max|w| / Qp of the current weight, recomputed in every forward pass and never trained;
w_q = s * clamp(round(w / s), Qn, Qp) on the same integer grid as LSQ; plain straight-through
gradient (no clipping). Applied once without training it is round-to-nearest PTQ.
"""

from __future__ import annotations

import torch

from .base import Grid, lsq_grid
from .family import Quantizer
from .registry import register_quantizer


@register_quantizer("absmax")
class AbsmaxQuantizer(Quantizer):
    supported_bits = (2, 3, 4, 5, 6, 8)
    learnable = False

    def grid(self) -> Grid:
        return lsq_grid(int(self.bits), mask_all=True)

    def init_scale(self, groups: torch.Tensor) -> torch.Tensor:
        return groups.abs().amax(dim=-1) / self.grid().qp_int
