"""GGUF blocks of ggml's k-quants, IQ4_NL, Q4_1 and Q5_1, packed from the QAT codes and block scales of the
ggml families (:mod:`hf_qat.quantizers.kquants`): the inverse of ggml's ``dequantize_row_<type>``
(ggml-common.h's structs, ggml-quants.c's unpacking), byte for byte. gguf-py's ``dequantize`` reads
them back to the QAT weights exactly (tests/export/test_kquant_export.py). Each type's layout is one function
``(unsigned codes [R, S, super_block], Blocks) -> the block's byte fields in order``, which its
:class:`~.kquants.GGMLGrid` names; :func:`pack_ggml` lays them out.

Layouts, per super-block of 256 weights (``e`` = element index in it, codes stored unsigned as ``u``):

* Q4_K (144 bytes): fp16 ``d``, fp16 ``dmin``, 12 bytes of 6-bit ``sc``/``mq`` (:func:`k4_scale_bytes`),
  128 bytes: chunk ``c`` of 64 holds ``e = 64c + l`` in the low nibble of byte ``32c + l`` and
  ``64c + 32 + l`` in the high nibble.
* Q5_K (176): ``d``, ``dmin``, 12 scale bytes, 32 bytes ``qh`` (bit ``2c`` / ``2c + 1`` of byte ``l``: the
  fifth bit of ``64c + l`` / ``64c + 32 + l``), then the low nibbles as Q4_K.
* Q6_K (210): 128 bytes ``ql``, 64 bytes ``qh``, 16 int8 scales, fp16 ``d``; ``u = code + 32``; half
  ``n`` of 128: ``e = 128n + 32k + l`` (k = 0..3) has its low nibble in ``ql[64n + l + 32 (k odd)]``
  (high nibble for k >= 2) and its top two bits at bit ``2k`` of ``qh[32n + l]``.
* Q3_K (110): 32 bytes ``hmask``, 64 bytes ``qs``, 12 bytes of 6-bit ``sc + 32``, fp16 ``d``; ``u = code + 4``;
  ``e = 128n + 32j + 16h + l``: low two bits at bit ``2j`` of ``qs[32n + 16h + l]``, the third bit at bit
  ``4n + j`` of ``hmask[16h + l]``.
* Q2_K (84): 16 bytes ``sc | mq << 4``, 64 bytes ``qs`` (the Q3_K low-bit order), fp16 ``d``, fp16 ``dmin``.

and per block of 32: IQ4_NL (18): fp16 ``d``, 16 bytes of level indices (element ``j`` low nibble,
``j + 16`` high); Q4_1 (20): fp16 ``d``, fp16 ``m`` (= ``-min``), 16 bytes as IQ4_NL; Q5_1 (24): fp16 ``d``, fp16 ``m`` (= ``-min``), 4 bytes ``qh`` (bit ``j``: the fifth bit of
element ``j``), 16 bytes as IQ4_NL.

Blocks of codes and fp16 steps, from the integer and ternary families' codes (:func:`pack_steps`):

* Q4_0 (32 weights, 18 bytes): fp16 ``d`` then 16 bytes; byte j holds element j (low nibble) and j + 16 (high)
  as ``q + 8``. Q5_0 (22): ``d``, 4 bytes ``qh`` (bit j: the fifth bit of element j), then the low nibbles as
  Q4_0, codes stored as ``q + 16``. Q8_0 (34): ``d`` then 32 int8.
* TQ2_0 (256 weights, 66 bytes): 64 bytes of 2-bit codes ``q + 1`` (byte ``c*32 + m`` holds elements
  ``c*128 + l*32 + m`` at bits ``2l``), then fp16 ``d``. TQ1_0 (54 bytes): trits ``t = q + 1`` packed five per
  byte as the base-3 number ``n = sum t_i 3^(4-i)`` stored as ``ceil(n * 256 / 243)`` (llama.cpp recovers trit
  i as ``(byte * 3^i mod 256) * 3 >> 8``): 32 bytes for elements ``m + 32i`` (0..159), 16 bytes for
  ``160 + m + 16i``, 4 bytes of four trits (``240 + j + 4i``, a zero fifth trit), then fp16 ``d``.

and FP4 blocks from the E2M1 families' 4-bit encodings and stored scales (:func:`pack_fp4`): MXFP4
(``block_mxfp4``, 32 weights): the E8M0 exponent byte, then 16 bytes, element j in the low nibble of byte j and
j + 16 in the high one (indices of ggml's ``kvalues_fp4``, doubled E2M1 values dequantized with half the
scale: exactly the doubled codes times the step); NVFP4 (``block_nvfp4``, 64 weights = four sub-blocks of 16):
four UE4M3 scale bytes ``s_b``, then 32 bytes, byte ``8s + j`` holding element ``16s + j`` (low) and
``16s + j + 8`` (high).
"""

from __future__ import annotations

import numpy as np
import torch

from ..llamacpp.file_types import BLOCK


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``[..., n]`` holding fp16 values -> uint8 ``[..., 2n]`` (little-endian halves)."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def k4_scale_bytes(sc: torch.Tensor, mq: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins ``[..., 8]`` -> ggml's 12 bytes (the inverse of ``get_scale_min_k4``):
    bytes 0..3 ``sc_j | (sc_{j+4} >> 4) << 6``, 4..7 ``mq_j | (mq_{j+4} >> 4) << 6``, 8..11
    ``(sc_{j+4} & 15) | (mq_{j+4} & 15) << 4``."""
    lo_s, hi_s, lo_m, hi_m = sc[..., :4], sc[..., 4:], mq[..., :4], mq[..., 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 15) | ((hi_m & 15) << 4)], -1)


def k3_scale_bytes(s: torch.Tensor) -> torch.Tensor:
    """Sixteen 6-bit values ``[..., 16]`` -> Q3_K's 12 bytes: byte ``i`` (0..7) ``(s_i & 15) | (s_{i+8} & 15) << 4``,
    byte ``8 + i`` (0..3) the top two bits of ``s_i``, ``s_{i+4}``, ``s_{i+8}``, ``s_{i+12}`` at bits 0, 2, 4, 6."""
    low = (s[..., :8] & 15) | ((s[..., 8:] & 15) << 4)
    high = sum(((s[..., 4 * k:4 * k + 4] >> 4) << (2 * k)) for k in range(4))
    return torch.cat([low, high], -1)


def _low_bits_2(u: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., 256]`` (< 4 after masking) -> 64 bytes: ``e = 128n + 32j + i`` at bit ``2j`` of byte
    ``32n + i`` (Q2_K and Q3_K)."""
    u = (u & 3).view(*u.shape[:-1], 2, 4, 32)
    return sum(u[..., j, :] << (2 * j) for j in range(4)).reshape(*u.shape[:-3], 64)


def _nibbles_k(u: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., 256]`` -> 128 bytes: ``64c + l`` low nibble, ``64c + 32 + l`` high (Q4_K, Q5_K)."""
    u = (u & 15).view(*u.shape[:-1], 4, 2, 32)
    return (u[..., 0, :] | (u[..., 1, :] << 4)).reshape(*u.shape[:-3], 128)


def level_index(values: tuple[int, ...]) -> torch.Tensor:
    """``int16 [256]``: a level of the table ``values`` (IQ4_NL's ``kvalues_iq4nl``) plus 128 -> its index."""
    index = torch.zeros(256, dtype=torch.int16)
    index[torch.tensor(values) + 128] = torch.arange(len(values), dtype=torch.int16)
    return index


class Blocks:
    """A matrix's block scales as the layouts read them, ``[R, S, ...]`` per super-block ``S`` (fp16 ones as bytes)."""

    def __init__(self, scales, rows: int, supers: int) -> None:
        self.scales, self.rows, self.supers = scales, rows, supers

    def _shaped(self, t: torch.Tensor, last: int = -1) -> torch.Tensor:
        return t.reshape(self.rows, self.supers, last)

    @property
    def d(self) -> torch.Tensor:
        return _fp16_bytes(self._shaped(self.scales.d, 1))

    @property
    def dmin(self) -> torch.Tensor:
        return _fp16_bytes(self._shaped(self.scales.dmin, 1))

    @property
    def m(self) -> torch.Tensor:
        """``-min`` of each block (Q4_1, Q5_1), fp16 bytes."""
        return _fp16_bytes(-self._shaped(self.scales.min, 1))

    @property
    def sc(self) -> torch.Tensor:
        return self._shaped(self.scales.sc.to(torch.uint8))

    @property
    def mq(self) -> torch.Tensor:
        return self._shaped(self.scales.mq.to(torch.uint8))


def nibbles_32(u: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., 32]`` -> 16 bytes: element ``j`` in the low nibble of byte ``j``, ``j + 16`` in the high one."""
    return (u[..., :16] & 15) | ((u[..., 16:] & 15) << 4)


def _fifth_bits(u: torch.Tensor) -> torch.Tensor:
    """Codes ``[..., 32]`` -> 4 bytes ``qh``: bit ``j`` the fifth bit of element ``j``."""
    qh = sum(((u[..., j] >> 4).to(torch.int64) << j) for j in range(32))
    return qh.unsqueeze(-1).view(torch.uint8)[..., :4]


def iq4_nl(u: torch.Tensor, b: Blocks) -> list[torch.Tensor]:
    return [b.d, nibbles_32(u)]


def q4_1(u: torch.Tensor, b: Blocks) -> list[torch.Tensor]:
    return [b.d, b.m, nibbles_32(u)]


def q5_1(u: torch.Tensor, b: Blocks) -> list[torch.Tensor]:
    return [b.d, b.m, _fifth_bits(u), nibbles_32(u)]


def q4_k(u: torch.Tensor, b: Blocks) -> list[torch.Tensor]:
    return [b.d, b.dmin, k4_scale_bytes(b.sc, b.mq), _nibbles_k(u)]


def q5_k(u: torch.Tensor, b: Blocks) -> list[torch.Tensor]:
    high = (u >> 4).view(b.rows, b.supers, 4, 2, 32)
    qh = sum(high[..., c, h, :] << (2 * c + h) for c in range(4) for h in range(2))
    return [b.d, b.dmin, k4_scale_bytes(b.sc, b.mq), qh, _nibbles_k(u)]


def q6_k(u: torch.Tensor, b: Blocks) -> list[torch.Tensor]:
    halves = u.view(b.rows, b.supers, 2, 4, 32)
    ql = torch.cat([(halves[..., 0, :] & 15) | ((halves[..., 2, :] & 15) << 4),
                    (halves[..., 1, :] & 15) | ((halves[..., 3, :] & 15) << 4)], -1)
    qh = sum((halves[..., k, :] >> 4) << (2 * k) for k in range(4))
    return [ql.reshape(b.rows, b.supers, 128), qh.reshape(b.rows, b.supers, 64), b.sc, b.d]


def q3_k(u: torch.Tensor, b: Blocks) -> list[torch.Tensor]:
    halves = (u >> 2).view(b.rows, b.supers, 2, 4, 32)  # [n, j, 16h + l]
    hmask = sum(halves[..., n, j, :] << (4 * n + j) for n in range(2) for j in range(4))
    return [hmask, _low_bits_2(u), k3_scale_bytes(b.sc + 32), b.d]


def q2_k(u: torch.Tensor, b: Blocks) -> list[torch.Tensor]:
    return [b.sc | (b.mq << 4), _low_bits_2(u), b.d, b.dmin]


def pack_ggml(codes: torch.Tensor, scales, grid) -> np.ndarray:
    """``codes int8 [R, C]`` with their block scales (:class:`~.kquants.BlockScales`) on the
    :class:`~.kquants.GGMLGrid` ``grid`` -> the raw GGUF blocks ``uint8 [R, bytes]``: the codes stored unsigned
    (a table type's as level indices) in ``[R, S, super_block]``, laid out by ``grid.layout``."""
    rows, cols = codes.shape
    supers = cols // grid.super_block
    q = codes.to(torch.int16)
    if grid.values and not bool(torch.isin(q, torch.tensor(grid.values, dtype=q.dtype)).all()):
        raise ValueError(f"{grid.ggml_type} codes must be its levels {grid.values}")
    u = level_index(grid.values)[(q + 128).long()] if grid.values else q - grid.lo  # unsigned codes
    u = u.to(torch.uint8).reshape(rows, supers, grid.super_block)
    out = torch.cat([p.to(torch.uint8) for p in grid.layout(u, Blocks(scales, rows, supers))], -1)
    assert out.shape[-1] == grid.block_bytes, (grid.ggml_type, out.shape)
    return out.reshape(rows, -1).numpy()


# The block types whose blocks hold codes and one scale (or four, NVFP4) per block, written from the codes and
# steps of the families that ask no layout of their own (:meth:`~.family.Quantizer.pack_gguf`), and the bytes of
# one block's scales (the rest of the block is codes).
SCALE_BYTES = {"Q4_0": 2, "Q5_0": 2, "Q8_0": 2, "TQ1_0": 2, "TQ2_0": 2, "MXFP4": 1, "NVFP4": 4}


def _base3_bytes(trits: torch.Tensor) -> torch.Tensor:
    """``trits [..., k, m]`` in 0..2 (k <= 5 trits per byte, most significant first, padded to five
    with zeros) -> ``uint8 [..., m]``: ``ceil(n * 256 / 243)`` of the base-3 number ``n``."""
    k = trits.shape[-2]
    powers = torch.tensor([3 ** (4 - i) for i in range(k)], dtype=torch.int32).view(k, 1)
    n = (trits.to(torch.int32) * powers).sum(-2)
    return ((n * 256 + 242) // 243).to(torch.uint8)


def pack_steps(codes: torch.Tensor, step: torch.Tensor, qtype: str) -> np.ndarray:
    """``codes int8 [R, C]`` and their fp16-exact steps ``[R, C / block]`` -> the raw blocks ``uint8 [R, bytes]``
    of ``qtype``: Q4_0, Q5_0, Q8_0 (blocks of 32), TQ1_0, TQ2_0 (ternary, 256)."""
    rows, cols = codes.shape
    block = BLOCK[qtype]
    q = codes.to(torch.int16).view(rows, cols // block, block)
    d = step.to(torch.float16).contiguous().view(torch.uint8).view(rows, cols // block, 2)
    if qtype == "Q4_0":
        out = torch.cat([d, nibbles_32((q + 8).to(torch.uint8))], dim=-1)
    elif qtype == "Q5_0":  # d, 4 bytes qh (bit j: the fifth bit of element j), 16 bytes as Q4_0
        u = (q + 16).to(torch.uint8)
        out = torch.cat([d, _fifth_bits(u), nibbles_32(u)], dim=-1)
    elif qtype == "Q8_0":
        out = torch.cat([d, q.to(torch.int8).view(torch.uint8)], dim=-1)
    elif qtype == "TQ1_0":
        t = q + 1
        qs = torch.cat([_base3_bytes(t[..., :160].reshape(rows, -1, 5, 32)),
                        _base3_bytes(t[..., 160:240].reshape(rows, -1, 5, 16))], dim=-1)
        qh = _base3_bytes(t[..., 240:].reshape(rows, -1, 4, 4))
        out = torch.cat([qs, qh, d], dim=-1)
    elif qtype == "TQ2_0":
        u = (q + 1).to(torch.uint8).view(rows, cols // block, 2, 4, 32)
        qs = u[..., 0, :] | (u[..., 1, :] << 2) | (u[..., 2, :] << 4) | (u[..., 3, :] << 6)
        out = torch.cat([qs.reshape(rows, cols // block, 64), d], dim=-1)
    else:
        raise ValueError(f"{qtype} is not a block type of codes and steps ({', '.join(SCALE_BYTES)})")
    return out.reshape(rows, -1).numpy()


def pack_fp4(nibbles: torch.Tensor, scales: torch.Tensor, qtype: str) -> np.ndarray:
    """E2M1 elements as 4-bit encodings ``uint8 [R, C]`` and their stored scale bytes ``uint8 [R, C / scale block]``
    -> the raw blocks of ``qtype``: MXFP4 (32 weights: the E8M0 byte, then 16 bytes, element ``j`` in the low nibble
    of byte ``j`` and ``j + 16`` in the high one), NVFP4 (64 weights: four E4M3 bytes, then each 16 weights' 8 bytes,
    element ``j`` low and ``j + 8`` high)."""
    rows, cols = nibbles.shape
    blocks = cols // BLOCK[qtype]
    if qtype == "MXFP4":
        out = torch.cat([scales.view(rows, blocks, 1), nibbles_32(nibbles.view(rows, blocks, 32))], dim=-1)
    elif qtype == "NVFP4":
        e = nibbles.view(rows, blocks, 4, 16)
        qs = (e[..., :8] | (e[..., 8:] << 4)).reshape(rows, blocks, 32)
        out = torch.cat([scales.reshape(rows, blocks, 4), qs], dim=-1)
    else:
        raise ValueError(f"{qtype} is not an FP4 block type (MXFP4, NVFP4)")
    return out.reshape(rows, -1).numpy()
