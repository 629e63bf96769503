"""Integer packing shared by export and the native loader.

Codes are packed along the input dim as one little-endian bitstream: unsigned value ``i`` of a row
occupies bits ``[i * b, (i + 1) * b)``, element 0 in the lowest bits of byte 0. Eight values fill
exactly ``b`` bytes, so every width from 1 to 8 bits packs without waste (3, 5, 6 bits too), and
rows are padded to a multiple of 8 values. Read as little-endian int32 words, the same bytes are
compressed-tensors' ``pack-quantized`` layout (values ``q + 2^(b-1)`` in b-bit fields, element 0 in
the lowest bits) whenever ``cols * b`` is a multiple of 32.

A packed weight is dequantized through a code table: ``weight = table[u] * step`` in fp32, cast to
the weight dtype (``dequantize_reference``; the Triton kernel in ``triton_unpack.py`` matches it).
"""

from __future__ import annotations

import torch


def packed_bytes_per_row(cols: int, bits: int) -> int:
    return -(-cols // 8) * bits


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``values [R, C]`` (integers in ``[0, 2^bits)``) -> ``uint8 [R, ceil(C / 8) * bits]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if values.dim() != 2:
        raise ValueError(f"pack_bits takes a 2-D tensor, got shape {tuple(values.shape)}")
    rows, cols = values.shape
    v = values.to(torch.int64)
    if bool(((v < 0) | (v >= (1 << bits))).any()):
        raise ValueError(f"values must lie in [0, {1 << bits}) to pack into {bits} bits")
    pad = (-cols) % 8
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.view(rows, -1, 8)
    word = torch.zeros(v.shape[:2], dtype=torch.int64, device=v.device)
    for i in range(8):
        word |= v[..., i] << (i * bits)
    out = torch.stack([(word >> (8 * k)) & 0xFF for k in range(bits)], dim=-1)
    return out.to(torch.uint8).view(rows, -1)


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [R, ceil(cols / 8) * bits]`` -> ``int64 [R, cols]``."""
    rows = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.shape[1] != packed_bytes_per_row(cols, bits):
        raise ValueError(
            f"packed weight must be uint8 [rows, {packed_bytes_per_row(cols, bits)}] for {cols} columns at "
            f"{bits} bits, got {packed.dtype} {tuple(packed.shape)}"
        )
    b = packed.to(torch.int64).view(rows, -1, bits)
    word = torch.zeros(b.shape[:2], dtype=torch.int64, device=packed.device)
    for k in range(bits):
        word |= b[..., k] << (8 * k)
    mask = (1 << bits) - 1
    values = torch.stack([(word >> (i * bits)) & mask for i in range(8)], dim=-1)
    return values.view(rows, -1)[:, :cols]


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors ``pack-quantized`` words: ``int32 [R, ceil(C * bits / 32)]``."""
    packed = pack_bits(values, bits)
    rows = packed.shape[0]
    words = -(-values.shape[1] * bits // 32)
    pad = words * 4 - packed.shape[1]
    if pad > 0:
        packed = torch.nn.functional.pad(packed, (0, pad))
    return packed[:, : words * 4].contiguous().view(torch.int32).view(rows, words)


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`."""
    rows = words.shape[0]
    raw = words.contiguous().view(torch.uint8).view(rows, -1)
    need = packed_bytes_per_row(cols, bits)
    if raw.shape[1] < need:
        raw = torch.nn.functional.pad(raw, (0, need - raw.shape[1]))
    return unpack_bits(raw[:, :need].contiguous(), bits, cols)


def expand_groups(step: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Per-scale values ``[R or 1, n_groups]`` repeated to one per weight ``[rows, cols]``."""
    per = cols // step.shape[1]
    return step.repeat_interleave(per, dim=1).expand(rows, cols)


def dequantize_reference(packed: torch.Tensor, bits: int, cols: int, table: torch.Tensor, step: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """``table[u] * step`` in fp32, cast to ``dtype``: the weight a packed layer computes with."""
    u = unpack_bits(packed, bits, cols)
    codes = table.to(torch.float32)[u]
    return (codes * expand_groups(step.float(), packed.shape[0], cols)).to(dtype)
