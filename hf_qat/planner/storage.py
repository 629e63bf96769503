"""Bits per weight in memory: what the planner's tokens per parameter byte and best-bits' memory budget count.

A weight format is a bit width B (what a law is fitted on) and the bits one weight takes in memory:

* a bare bit width ("4"): B itself, the paper's count (scales not counted; ternary log2 3);
* a block-scaled family, named as registered: its family's own ``storage_bits``, block scales included
  (for example 4 bits in blocks of 32 with one 8-bit scale each: 4 + 8 / 32 = 4.25; a per-tensor scale is
  not counted: 32 bits over a matrix of millions of weights);
* an integer format with fp16 group scales ("int4-g32"): B + 16 / G (int4-g32: 4.5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..bits import bits_label, effective_bits, normalize_bits


@dataclass(frozen=True)
class WeightFormat:
    """``name`` as written (a family's name, "4" or "int4-g32"), ``bits`` the law's B, ``storage_bits`` per weight in memory."""

    name: str
    bits: float | int
    storage_bits: float


def weight_format(spec: str | float | int, method: str | None = None) -> WeightFormat:
    """A bit width (with ``method``: that quantizer family's format when it fixes one), a block-scaled family
    (by its registered name), or "int<B>-g<G>" -> its :class:`WeightFormat`; ValueError names
    what is allowed."""
    from ..quantizers import available_quantizers, get_quantizer, get_quantizer_class

    text = spec.strip().lower() if isinstance(spec, str) else None
    if text in available_quantizers() and get_quantizer_class(text).block_size is not None:
        method, spec = text, get_quantizer_class(text).supported_bits[0]  # named by its family (bits fixed)
    match = re.fullmatch(r"int(\d)-g([1-9]\d*)", text or "")
    if match:
        bits, group = normalize_bits(int(match.group(1))), int(match.group(2))
        return WeightFormat(text, bits, bits + 16.0 / group)
    try:
        bits = normalize_bits(spec)
    except ValueError:
        blocked = ", ".join(name for name in available_quantizers() if get_quantizer_class(name).block_size is not None)
        raise ValueError(f"{spec!r} is not a weight format; write a bit width (1, 1.58, 2, 3, 4, 5, 6, 8), "
                         f"a block-scaled family ({blocked}), or int<B>-g<G> (e.g. int4-g32)") from None
    family_bits = get_quantizer(method, bits).storage_bits() if method not in (None, "auto") else None
    if family_bits is not None:
        return WeightFormat(method, bits, family_bits)
    return WeightFormat(bits_label(bits), bits, effective_bits(bits))
