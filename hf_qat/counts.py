"""Parsing human-written counts and sizes: "135M" parameters, "10B" tokens, "1GB" / "512MiB" memory."""

from __future__ import annotations

import re

_COUNT = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
_BYTES = {"": 1.0, "B": 1.0, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KIB": 2.0**10, "MIB": 2.0**20, "GIB": 2.0**30, "TIB": 2.0**40}


def parse_count(text: str | float | int) -> float:
    """'135M' -> 1.35e8, '10B' -> 1e10, '2T' -> 2e12, '1e9' -> 1e9 (K, M, B or G, T are powers of 1000)."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a count; write e.g. 135M, 10B, 2T or 1e9")
    return float(match.group(1)) * _COUNT[match.group(2).upper()]


def parse_bytes(text: str | float | int) -> float:
    """'1GB' -> 1e9, '512MiB' -> 2^29, '4e9' -> 4e9 bytes."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _BYTES:
        raise ValueError(f"{text!r} is not a size; write e.g. 1GB, 512MiB or 4e9")
    return float(match.group(1)) * _BYTES[unit]


def human(value: float, unit: str = "") -> str:
    """1.35e8 -> '135M'; 2.6e9 -> '2.6B'; bytes (``unit="B"``): 1e9 -> '1GB'."""
    billion = "G" if unit == "B" else "B"  # 1e9 bytes are a GB, not a "BB"
    for suffix, scale in (("T", 1e12), (billion, 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"
