"""NVFP4: blocks of 16 weights along the input dim, FP4 E2M1 elements, an FP8 E4M3 scale per block
times one FP32 scale per tensor (compressed-tensors' ``nvfp4-pack-quantized``, ggml's ``block_nvfp4``).

Per tensor (a fused expert stack is one tensor), with s the learned block scales (weight units):

    g     = the largest power of two with max(s) * g <= 448          (block_scales.tensor_scale)
    s_b   = e4m3(clamp(s * g, 2^-9, 448))                             (round to nearest even)
    s_r   = s_b / g
    code  = 2 * E2M1(clamp(w / s_r, -6, 6))                           (round to nearest, ties to even)
    w_q   = (s_r / 2) * code                                           (exact in fp32 and bfloat16)

What is stored: ``code`` (4 bits), ``s_b`` (E4M3) and ``g`` (compressed-tensors' ``weight_global_scale``,
whose own rule 448 * 6 / amax(W) this is rounded down to a power of two, for exactness: see
:mod:`.block_scales`). The E2M1 tie rule is MXFP4's (:class:`~.family.E2M1Quantizer`).

Learned: ``s = init * exp(log_scale_ratio)`` (first scale amax / 6: the block's largest weight on the
largest element, as compressed-tensors, ModelOpt and ggml quantize), rounded to E4M3 in the forward,
with LSQ's straight-through gradient (factor E2M1(r) - r inside, -6 / +6 where clipped); ``g`` is a
power of two, so no gradient flows through it; the weight gradient passes where |r| <= 6.
"""

from __future__ import annotations

import torch

from .block_scales import e4m3_split
from .family import E2M1Quantizer
from .registry import register_quantizer


@register_quantizer("nvfp4")
class NVFP4Quantizer(E2M1Quantizer):
    block_size = 16
    scale_dtype = torch.float8_e4m3fn
    compressed_tensors_scheme = ("nvfp4-pack-quantized", "NVFP4A16")
    first_scale_divisor = 6.0
    tensor_scale = True

    def stored_scales(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``s_b`` float8_e4m3fn and ``g`` fp32 ``[]`` with ``s_b / g == 2 * step`` exactly."""
        return e4m3_split(step.float() * 2)
