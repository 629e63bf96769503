"""LSQ (learned step size) for 2 to 8 bits, as used by ParetoQ (arXiv 2502.02631) at 3+ bits.

w_q = s * clamp(round(w / s), Qn, Qp) with Qn = -2^(b-1), Qp = 2^(b-1) - 1; first scale max|w| / Qp;
the weight gradient passes where Qn <= r <= Qp; scale-gradient factor Qn / Qp outside, round(r) - r
inside; g uses Qp_int = Qp.
"""

from __future__ import annotations

import torch

from .base import Grid, lsq_grid
from .family import Quantizer
from .registry import register_quantizer


@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    supported_bits = (2, 3, 4, 5, 6, 8)
    llama_cpp_types = {"Q4_0": (4, 32), "Q5_0": (5, 32), "Q8_0": (8, 32)}

    def grid(self) -> Grid:
        return lsq_grid(int(self.bits))

    def init_scale(self, groups: torch.Tensor) -> torch.Tensor:
        return groups.abs().amax(dim=-1) / self.grid().qp_int
