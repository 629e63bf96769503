"""Bit widths: the allowed values, their normal form, their label and their byte count.

The bottom of the package: it imports nothing from hf_qat but the errors, so config, quantizers and
planner can all use it without an import circle.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import QATConfigError

TERNARY_BITS = 1.58
ALLOWED_BITS = (1, TERNARY_BITS, 2, 3, 4, 5, 6, 8)
ALLOWED_BITS_TEXT = "1, 1.58 (or 'ternary'), 2, 3, 4, 5, 6, 8"


def normalize_bits(value: Any, field_name: str = "bits") -> float | int:
    """Return ``value`` as one of :data:`ALLOWED_BITS` (1.58 for ternary) or raise QATConfigError."""
    original = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("ternary", "1.58", "1.5", "b1.58"):
            return TERNARY_BITS
        try:
            value = float(text)
        except ValueError:
            raise QATConfigError(field_name, original, ALLOWED_BITS_TEXT) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise QATConfigError(field_name, original, ALLOWED_BITS_TEXT)
    if math.isclose(value, TERNARY_BITS, abs_tol=0.01) or math.isclose(value, math.log2(3), abs_tol=1e-6):
        return TERNARY_BITS
    if float(value).is_integer() and int(value) in ALLOWED_BITS:
        return int(value)
    raise QATConfigError(field_name, original, ALLOWED_BITS_TEXT)


def bits_label(bits: float | int) -> str:
    """'ternary' for 1.58, else the integer as text ('4')."""
    return "ternary" if bits == TERNARY_BITS else str(int(bits))


def effective_bits(bits: float | int | str) -> float:
    """Bits per weight for the byte count: log2(3) for ternary, else the bit width."""
    bits = normalize_bits(bits)
    return math.log2(3) if bits == TERNARY_BITS else float(bits)
