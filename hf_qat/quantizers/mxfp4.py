"""MXFP4 (OCP Microscaling 1.0): blocks of 32 weights along the input dim, FP4 E2M1 elements, one E8M0
(power-of-two) scale per block.

Per block, with s its learned scale (weight units) and r = w / s_r:

    s_r   = 2^floor(log2 max(s, 1e-5))                     (E8M0: block_scales.e8m0)
    code  = 2 * E2M1(clamp(r, -6, 6))                       (round to nearest, ties to even; -12..12)
    w_q   = (s_r / 2) * code                                 (exact in fp32 and bfloat16)

E2M1 = {0, 0.5, 1, 1.5, 2, 3, 4, 6} and negatives; a tie goes to the element whose mantissa bit is 0
(0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), as compressed-tensors' and the
OCP spec's round-to-nearest-even. ggml's own quantizer (``best_index_mxfp4``) breaks ties toward the
smaller magnitude instead; ties only decide which code is chosen, and llama.cpp only dequantizes ours.

Learned: ``s = init * exp(log_scale_ratio)``, a float before the power-of-two rounding, trained with
LSQ's straight-through gradient (factor E2M1(r) - r inside, -6 / +6 where clipped; the rounding of s
passes the gradient as the identity); the weight gradient passes where |r| <= 6.

The exponent rule. First scale ``amax / 4``: its floor is OCP's ``floor(log2 amax) - 2`` exactly (the
block maximum lands in [4, 8) and clips to 6 above 6), after which the exponent is learned (it moves
when s crosses a power of two). Measured (benchmarks/fp4_exponent.py, a 3.2M-parameter Llama trained
600 steps in FP on the demo corpus, then 200 QAT steps with the LR decayed to 0, seeds 0 / 1):
PTQ relative weight error of its Linear weights OCP 0.0138 / 0.0136, ceil (2^ceil(log2(amax / 6)),
never clips) 0.0143 / 0.0142, nearest (2^round(log2(amax / 6))) 0.0151 / 0.0150, the best of three
exponents per block 0.0129 / 0.0128 (Gaussian and Laplace weights rank the same); held-out loss after
QAT: fixed OCP exponent (recomputed every step, not learned) 3.2677 / 3.3254, learned from OCP 3.2711 /
3.3193, learned from ceil 3.2664 / 3.3191, FP with the same cooldown 3.2635 / 3.3215. After QAT the rules
are within 0.005 nats, the seed-to-seed spread of their differences, so none is measurably better;
OCP starts from the lowest closed-form PTQ error and is the standard's (and ggml's) rule, hence this
first scale, learned like NVFP4's.
"""

from __future__ import annotations

import torch

from .block_scales import e8m0_exponents
from .family import E2M1Quantizer
from .registry import register_quantizer


@register_quantizer("mxfp4")
class MXFP4Quantizer(E2M1Quantizer):
    block_size = 32
    scale_dtype = torch.float8_e8m0fnu
    compressed_tensors_scheme = ("mxfp4-pack-quantized", "MXFP4A16")
    llama_cpp_types = {"MXFP4": (4, 32)}
    first_scale_divisor = 4.0

    def stored_scales(self, step: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The E8M0 biased exponents, uint8 (no per-tensor scale)."""
        return e8m0_exponents(step.float() * 2), None
