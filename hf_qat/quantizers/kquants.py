"""ggml's k-quant grids (Q2_K .. Q6_K), IQ4_NL, Q4_1 and Q5_1 as QAT families.

Each family's forward computes exactly what ggml's ``dequantize_row_<type>`` computes, so a GGUF export
is packing only. The weight matrix ``[R, C]`` is cut along its input dim into blocks of ``block``
weights; every block has a learned scale ``s`` (and, for the asymmetric types, a learned min ``m >= 0``,
weight ~ ``s * q - m``). A k-quant groups ``super_block / block`` blocks under one fp16 ``d`` (and
``dmin``), and stores each block's scale (min) as a small integer times it:

    d      = fp16(max_j s_j / scale_max)              (at least 2^-24, fp16's smallest step)
    sc_j   = clamp(round(s_j / d), 1, scale_max)       (round half to even; 1: no block collapses to 0)
    dmin   = fp16(max_j m_j / min_max)
    mq_j   = clamp(round(m_j / dmin), 0, min_max)      (0 when dmin is 0)
    step_j = d * sc_j,  min_j = dmin * mq_j            (fp32; exact: at most 11 + 8 significant bits)

A type without super-blocks (IQ4_NL, Q4_1, Q5_1: ``scale_max == 0``) stores ``d = fp16(s)`` (and Q4_1 / Q5_1
``-fp16(m)``) per block. Then per weight, with the type's codes ``lo..hi``:

    r      = (w + min_j) / step_j                      (IEEE fp32; min_j = 0 for symmetric types)
    code   = clamp(round_half_even(r), lo, hi)        (IQ4_NL, IQ4_XS: the nearest of its 16 levels, ties to
                                                        the even index, as :func:`reference.nearest_magnitude`)
    value  = step_j * code - min_j                      (fp32: the product is exact, the subtraction is
                                                        ggml's one rounding; fused or not, the same)

Types (ggml-common.h / ggml-quants.c):

======== ====== ======== =========== ========= ======== ===========================
type     block  super    codes       scale_max min_max  bits / weight
======== ====== ======== =========== ========= ======== ===========================
Q2_K     16     256      0..3        15        15       2.625
Q3_K     16     256      -4..3       31 (*)    -        3.4375
Q4_K     32     256      0..15       63        63       4.5
Q5_K     32     256      0..31       63        63       5.5
Q6_K     16     256      -32..31     127 (*)   -        6.5625
IQ4_NL   32     32       16 levels   -         -        4.5
Q4_1     32     32       0..15       -         fp16     5.0
Q5_1     32     32       0..31       -         fp16     6.0
======== ====== ======== =========== ========= ======== ===========================

IQ4_XS (IQ4_NL's levels under Q3_K-like 6-bit block scales, 4.25 bits) runs on this math from a module of its own
in this package, which holds its grid and block layout (``IQ4XSQuantizer``).

(*) the format stores signed block scales (Q3_K and IQ4_XS: -32..31, Q6_K: -128..127); a learned scale is
positive, so QAT uses 1..31 and 1..127 (the quantizers of llama.cpp use the sign of the block's
largest weight, a symmetric choice that changes nothing for symmetric codes except at -lo).

Learned: ``s = init_s * exp(rho_s)`` and ``m = init_m * exp(rho_m)`` (a scale pair per block for the
asymmetric types), straight-through through every rounding (of ``code``, ``sc``, ``mq``, ``d``,
``dmin``). Gradients, with ``g`` ParetoQ's factor (``Qp = hi``):

    dL/dw = dL/dvalue where lo <= r <= hi, else 0
    dL/ds = g * sum over the block of dL/dvalue * (code - r inside, code where clipped)
    dL/dm = g * sum over the block of dL/dvalue * (0 inside, -1 where clipped)

First scales (from the block's weights ``w``): symmetric ``s = max|w| / hi`` (Q6_K 31, Q3_K 3, IQ4_NL 113:
no weight clips, as LSQ's ``max|w| / Qp``); asymmetric ``m = max(-min(w), 1e-5)``, ``s = (max(w) + m) / hi``: the
block's range on the codes, as ggml's round-to-nearest baseline starts. ``scale_init="mse"`` then
shrinks each block's range by the clipping ratio of least squared error (:func:`ggml_mse_scale`), as
llama.cpp's own quantizers search their block scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..llamacpp.file_types import BLOCK, FALLBACK, file_type_of
from .base import SCALE_MIN, Grid
from .family import Quantizer
from . import ggml_blocks
from .ggml_blocks import pack_ggml
from .reference import MSE_SCALE_RATIOS, nearest_value_, tree_sum
from .registry import register_quantizer

FP16_TINY = 2.0**-24  # fp16's smallest positive value: d never rounds to 0
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class GGMLGrid:
    """One ggml block type's numbers (see the module table).

    Attributes:
        ggml_type: the GGML type name ("Q4_K").
        bits: bits per code (the family's ``bits``).
        block: weights per block (one scale, and min, each).
        lo, hi: the codes' range.
        scale_max: the largest integer block scale (0: the block scale is fp16 itself).
        min_max: the largest integer block min (0: fp16 itself); None for symmetric types.
        values: a table of levels (IQ4_NL): the code is the nearest level.
        bits_per_weight: what the format stores per weight, scales included.
        layout: the GGUF block's byte layout (:func:`~.ggml_blocks.pack_ggml` calls it; :mod:`.ggml_blocks`
            has the layouts of the types here).
    """

    ggml_type: str
    bits: int
    block: int
    lo: int
    hi: int
    scale_max: int
    min_max: int | None
    bits_per_weight: float
    layout: Callable
    values: tuple[int, ...] = ()

    @property
    def super_block(self) -> int:
        """Weights per super-block (one fp16 ``d``, ``dmin``); ``block`` when there is none: ggml's block size
        of the type (llama.cpp's table, :data:`hf_qat.llamacpp.file_types.BLOCK`)."""
        return BLOCK[self.ggml_type]

    @property
    def block_bytes(self) -> int:
        """Bytes of one GGUF block (a super-block when there are any), scales included."""
        return round(self.bits_per_weight * self.super_block / 8)

    @property
    def asymmetric(self) -> bool:
        return self.min_max is not None

    @property
    def description(self) -> str:
        """The block's storage in words ("integer block scales and mins under an fp16 super-block scale ...")."""
        levels = "a table of non-uniform levels, " if self.values else ""
        minimum = " and mins" if self.asymmetric else ""
        if self.scale_max:
            return (f"{levels}integer block scales{minimum} of {self.block} weights under an fp16 scale per "
                    f"super-block of {self.super_block}")
        return f"{levels}an fp16 scale{' and min' if self.asymmetric else ''} per block of {self.block}"

    @property
    def blocks_per_super(self) -> int:
        return self.super_block // self.block


# The ggml block types by family name, filled by :func:`ggml_family`.
GRIDS: dict[str, GGMLGrid] = {}


@dataclass
class BlockScales:
    """The rounded scales of a matrix ``[R, C]`` with ``G = C / block`` blocks per row (fp32 unless said).

    Attributes:
        step: ``[R, G]`` ``d * sc`` (or ``d``): the value of one code step.
        min: ``[R, G]`` ``dmin * mq`` (or ``fp16(m)``), subtracted; None for symmetric types.
        d: ``[R, G / blocks_per_super]`` fp16 values (as fp32); ``dmin`` likewise, or None.
        sc, mq: ``[R, G]`` the integer block scales and mins (int32), or None without super-blocks.
    """

    step: torch.Tensor
    min: torch.Tensor | None
    d: torch.Tensor
    dmin: torch.Tensor | None
    sc: torch.Tensor | None
    mq: torch.Tensor | None

    def map(self, fn) -> "BlockScales":
        """``fn`` applied to every tensor (all are row-wise: a row permutation or a device move)."""
        return BlockScales(*(None if t is None else fn(t) for t in
                             (self.step, self.min, self.d, self.dmin, self.sc, self.mq)))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _two_level(values: torch.Tensor, top: int, per_super: int, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``values [R, G]`` (>= 0) -> ``(d fp16-valued [R, G / per_super], q int32 [R, G])`` with
    ``d = max(fp16(max / top), floor)`` per super-block, ``q = clamp(round(v / d), floor > 0, top)``."""
    rows, groups = values.shape
    sub = values.reshape(rows, groups // per_super, per_super)
    d = _fp16(sub.amax(-1) / top).clamp_min(floor)
    if floor == 0.0:  # mins: a super-block without any has dmin = 0 and all mq = 0
        q = torch.where(d.unsqueeze(-1) > 0, torch.round(sub / d.clamp_min(FP16_TINY).unsqueeze(-1)), 0.0).clamp(0, top)
    else:
        q = torch.round(sub / d.unsqueeze(-1)).clamp(1, top)
    return d, q.reshape(rows, groups).to(torch.int32)


def block_scales(scale: torch.Tensor, grid: GGMLGrid) -> BlockScales:
    """Learned ``scale [R, G]`` (or ``[R, G, 2]``: scale and min for an asymmetric type, fp32, weight
    units) -> the rounded :class:`BlockScales` (the module docstring's first four lines)."""
    scale = scale.detach().float()
    s = (scale[..., 0] if grid.asymmetric else scale).clamp_min(SCALE_MIN)
    m = scale[..., 1].clamp_min(0.0) if grid.asymmetric else None
    if grid.scale_max == 0:  # one fp16 scale (and min) per block
        d = _fp16(s).clamp_min(FP16_TINY)
        dmin = _fp16(m) if m is not None else None
        return BlockScales(step=d, min=dmin, d=d, dmin=dmin, sc=None, mq=None)
    per_super = grid.blocks_per_super
    d, sc = _two_level(s, grid.scale_max, per_super, FP16_TINY)
    step = d.repeat_interleave(per_super, dim=1) * sc
    if m is None:
        return BlockScales(step=step, min=None, d=d, dmin=None, sc=sc, mq=None)
    dmin, mq = _two_level(m, grid.min_max, per_super, 0.0)
    return BlockScales(step=step, min=dmin.repeat_interleave(per_super, dim=1) * mq, d=d, dmin=dmin, sc=sc, mq=mq)


def _blocks(matrix: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = matrix.shape
    return matrix.reshape(rows, cols // block, block)


def _ratio(matrix: torch.Tensor, scales: BlockScales, grid: GGMLGrid) -> torch.Tensor:
    """``r = (w + min) / step`` fp32 ``[R, G, block]``, a new tensor."""
    w = _blocks(matrix.float(), grid.block)
    if scales.min is None:
        return torch.div(w, scales.step.unsqueeze(-1))
    return torch.add(w, scales.min.unsqueeze(-1)).div_(scales.step.unsqueeze(-1))


def _codes_(r: torch.Tensor, grid: GGMLGrid) -> torch.Tensor:
    """The codes of ``r`` (clamped in place, then rounded in place or looked up in the levels)."""
    clamped = r.clamp_(grid.lo, grid.hi)
    return nearest_value_(clamped, grid.values) if grid.values else clamped.round_()


def _values_(codes: torch.Tensor, scales: BlockScales) -> torch.Tensor:
    """``step * code - min``, in place on ``codes`` (fp32 ``[R, G, block]``)."""
    value = codes.mul_(scales.step.unsqueeze(-1))
    return value if scales.min is None else value.sub_(scales.min.unsqueeze(-1))


def ggml_codes(matrix: torch.Tensor, scale: torch.Tensor, grid: GGMLGrid) -> tuple[torch.Tensor, BlockScales]:
    """``(codes int8 [R, C], BlockScales)``: what a GGUF packer writes; :func:`ggml_dequantize` of them is
    :func:`ggml_fake_quantize` exactly."""
    scales = block_scales(scale, grid)
    codes = _codes_(_ratio(matrix.detach(), scales, grid), grid)
    return codes.reshape(matrix.shape).to(torch.int8), scales


def ggml_dequantize(codes: torch.Tensor, scales: BlockScales, grid: GGMLGrid) -> torch.Tensor:
    """``codes [R, C]`` -> the fp32 weights ggml dequantizes them to."""
    return _values_(_blocks(codes.to(torch.float32, copy=True), grid.block), scales).reshape(codes.shape)


def ggml_forward_pass(matrix: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor | None,
                      grid: GGMLGrid) -> torch.Tensor:
    """The per-weight forward with the rounded block ``step`` and ``minimum`` (:class:`BlockScales`' fields):
    the matrix on the grid, in its dtype. The reference the Triton engine reproduces bit for bit."""
    scales = BlockScales(step, minimum, step, None, None, None)
    return _values_(_codes_(_ratio(matrix, scales, grid), grid), scales).reshape(matrix.shape).to(matrix.dtype)


def ggml_backward_pass(grad_output: torch.Tensor, matrix: torch.Tensor, step: torch.Tensor,
                       minimum: torch.Tensor | None, grid: GGMLGrid,
                       need_scale_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The straight-through backward's per-weight pass: the matrix's gradient (``grad`` where ``lo <= r <= hi``)
    and, with ``need_scale_grad``, per block the pairwise tree sums (``reference.tree_sum``) of
    ``grad * (code - r inside, code where clipped)`` and, asymmetric types, of ``-grad where clipped``
    (fp32 ``[R, G]`` or ``[R, G, 2]``, before ParetoQ's factor)."""
    scales = BlockScales(step, minimum, step, None, None, None)
    r = _ratio(matrix.detach(), scales, grid)
    clamped = r.clamp(grid.lo, grid.hi)
    outside = clamped != r  # r < lo or r > hi (or NaN)
    grad = _blocks(grad_output, grid.block)
    grad_matrix = grad.masked_fill(outside, 0).reshape(grad_output.shape)
    if not need_scale_grad:
        return grad_matrix, None
    g = grad.float()
    factor = _codes_(clamped, grid).sub_(r.masked_fill_(outside, 0.0))  # code - r inside, code where clipped
    sums = tree_sum(factor.mul_(g), dim=-1)
    if grid.asymmetric:
        sums = torch.stack([sums, tree_sum(torch.where(outside, -g, 0.0), dim=-1)], -1)
    return grad_matrix, sums


def ggml_fake_quantize(matrix: torch.Tensor, scale: torch.Tensor, grid: GGMLGrid) -> torch.Tensor:
    """Forward only: the matrix on the grid, in its dtype."""
    scales = block_scales(scale, grid)
    return ggml_forward_pass(matrix, scales.step, scales.min, grid)


@torch.no_grad()
def ggml_mse_scale(matrix: torch.Tensor, first_scale: torch.Tensor, grid: GGMLGrid,
                   ratios: tuple[float, ...] = MSE_SCALE_RATIOS, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``scale_init="mse"`` for the ggml families: per block, the candidate ``ratio * first_scale`` (scale and
    min alike: the block's range shrunk by ``ratio``) whose forward (:func:`ggml_fake_quantize`, super-block
    rounding included, every block of the matrix at that ratio) has the least squared error over the block;
    1.0 first, a later ratio wins only when strictly better. Blocks chosen apart share their super-block's
    ``d``, so a super-block whose error with the chosen scales exceeds its error with the first ones keeps
    the first ones: never worse than the first scale, super-block by super-block. ``matrix [R, C]``,
    ``first_scale`` as :meth:`GGMLQuantizer.init_scale` -> the same shape. ``importance`` (``[C]``) weights each
    column's error, as :func:`~hf_qat.quantizers.reference.mse_scale`."""
    w = matrix.float()
    per_super = grid.blocks_per_super
    weights = 1.0 if importance is None else importance.float().to(w.device)

    def block_error(scale: torch.Tensor) -> torch.Tensor:
        return _blocks((ggml_fake_quantize(w, scale, grid) - w).pow(2) * weights, grid.block).sum(-1)

    def pick(better: torch.Tensor, candidate: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        return torch.where(better.unsqueeze(-1) if grid.asymmetric else better, candidate, current)

    best, best_error = first_scale * ratios[0], block_error(first_scale * ratios[0])
    first_error = best_error
    for ratio in ratios[1:]:
        candidate = first_scale * ratio
        error = block_error(candidate)
        better = error < best_error
        best, best_error = pick(better, candidate, best), torch.where(better, error, best_error)
    rows, groups = first_error.shape
    super_error = block_error(best).reshape(rows, groups // per_super, per_super).sum(-1)
    worse = super_error > first_error.reshape(rows, groups // per_super, per_super).sum(-1)
    return pick(worse.repeat_interleave(per_super, dim=1), first_scale, best)


class GGMLFakeQuant(torch.autograd.Function):
    """Differentiable :func:`ggml_fake_quantize` of a matrix ``[R, C]``. The block scales are rounded here, in
    PyTorch; the per-weight passes are the ``engine``'s (``ggml_forward`` / ``ggml_backward``: this module's
    reference, or hf_qat.kernels' Triton kernels), chosen by the one dispatch point. Saves only its inputs;
    the backward recomputes the codes."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, scale: torch.Tensor, grid: GGMLGrid, grad_scale: float,
                engine) -> torch.Tensor:
        ctx.save_for_backward(matrix, scale)
        ctx.grid, ctx.grad_scale, ctx.engine = grid, grad_scale, engine
        scales = block_scales(scale, grid)
        return engine.ggml_forward(matrix, scales.step, scales.min, grid)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        matrix, scale = ctx.saved_tensors
        grid = ctx.grid
        scales = block_scales(scale, grid)
        grad_matrix, sums = ctx.engine.ggml_backward(grad_output.contiguous(), matrix.detach(), scales.step,
                                                     scales.min, grid, bool(ctx.needs_input_grad[1]))
        grad_scale = None
        if sums is not None:
            grad_s = sums * ctx.grad_scale
            s = scale.detach().float()
            clamped = (s[..., 0] if grid.asymmetric else s) < SCALE_MIN  # the scale's clamp: no gradient
            (grad_s[..., 0] if grid.asymmetric else grad_s).masked_fill_(clamped, 0.0)
            grad_scale = grad_s.to(scale.dtype)
        return grad_matrix, grad_scale, None, None, None


class GGMLQuantizer(Quantizer):
    """A family on one ggml block type (:data:`GRIDS`); subclasses set ``ggml_grid``."""

    ggml_grid: ClassVar[GGMLGrid]
    scale_dtype = torch.float16  # d (and dmin) are fp16
    export_formats = ("gguf",)

    @property
    def export_blocks(self) -> str:
        return self.ggml_grid.description

    def storage_bits(self) -> float:
        return self.ggml_grid.bits_per_weight

    def narrow_width_advice(self, width: int) -> str:
        """A llama.cpp file type whose base type is this one gives a weight 32 wide (ggml's smaller blocks)
        llama.cpp's fallback type, which hf_qat trains."""
        file_type = file_type_of(self.ggml_grid.ggml_type)
        if not file_type or self.ggml_grid.ggml_type not in FALLBACK or width % BLOCK[FALLBACK[self.ggml_grid.ggml_type]]:
            return ""
        return (f", or train llama.cpp's file type (QATConfig.from_preset({file_type!r})), which gives it llama.cpp's "
                f"fallback type {FALLBACK[self.ggml_grid.ggml_type]}")

    def grid(self) -> Grid:
        """The codes' range as a :class:`Grid` (for ``codes``, ``qp_int`` and export checks; the math is
        :class:`GGMLFakeQuant`'s)."""
        lo, hi = self.ggml_grid.lo, self.ggml_grid.hi
        return Grid(sign=False, clip_lo=float(lo), clip_hi=float(hi), mul=1.0, add=0.0, code_mul=1, code_add=0,
                    level=1.0, grad_lo=float(lo), grad_hi=float(hi), mask_lo=float(lo), mask_hi=float(hi),
                    qp_int=hi)

    def init_scale(self, groups: torch.Tensor) -> torch.Tensor:
        """``groups [R, G, block]`` -> ``[R, G]`` (symmetric) or ``[R, G, 2]`` (scale, min)."""
        grid = self.ggml_grid
        if not grid.asymmetric:
            return (groups.abs().amax(-1) / grid.hi).clamp_min(SCALE_MIN)
        m = (-groups.amin(-1)).clamp_min(SCALE_MIN)
        s = ((groups.amax(-1) + m) / grid.hi).clamp_min(SCALE_MIN)  # a zero block keeps a trainable scale
        return torch.stack([s, m], -1)


    def gguf_type(self, group_size: int | str, scale_dtype: torch.dtype, ternary_type: str) -> str:
        return self.ggml_grid.ggml_type

    def pack_gguf(self, codes: torch.Tensor, step: torch.Tensor, block_scales: BlockScales, qtype: str | None = None):
        return pack_ggml(codes, block_scales, self.ggml_grid)

    def own_forward(self):
        """:class:`GGMLFakeQuant`, its per-weight passes on the engine the dispatch chose."""
        return self._forward

    def _forward(self, matrix: torch.Tensor, scale: torch.Tensor, grad_scale: float, engine) -> torch.Tensor:
        return GGMLFakeQuant.apply(matrix, scale, self.ggml_grid, grad_scale, engine)

    def fake_quantize(self, matrix: torch.Tensor, scale: torch.Tensor, spec) -> torch.Tensor:
        return ggml_fake_quantize(matrix, scale, self.ggml_grid)

    def encode(self, matrix: torch.Tensor, scale: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor, BlockScales]:
        """``(codes, step, BlockScales)``: the matrix is ``step * codes - min`` (:func:`ggml_codes`)."""
        codes, scales = ggml_codes(matrix, scale, self.ggml_grid)
        return codes, scales.step, scales

    def mse_scale(self, matrix: torch.Tensor, first_scale: torch.Tensor, spec,
                  importance: torch.Tensor | None = None) -> torch.Tensor:
        return ggml_mse_scale(matrix, first_scale, self.ggml_grid, importance=importance)

def ggml_family(name: str, grid: GGMLGrid, module: str = __name__) -> type[GGMLQuantizer]:
    """Register the family ``name`` on the ggml block type ``grid`` (and ``grid`` in :data:`GRIDS`): a class named
    after the type without underscores (``Q4KQuantizer``), which ``module`` (the caller's ``__name__``) must bind
    to that name, so that it pickles."""
    GRIDS[name] = grid
    cls = type(f"{grid.ggml_type.replace('_', '')}Quantizer", (GGMLQuantizer,),
               {"ggml_grid": grid, "supported_bits": (grid.bits,), "block_size": grid.block,
                "row_multiple": grid.super_block, "llama_cpp_types": {grid.ggml_type: (grid.bits, grid.block)},
                "scale_components": 2 if grid.asymmetric else 1, "__module__": module,
                "__doc__": f"ggml's {grid.ggml_type} (see the module docstring)."})
    return register_quantizer(name)(cls)


Q2KQuantizer = ggml_family("q2_k", GGMLGrid("Q2_K", 2, 16, 0, 3, 15, 15, 2.625, ggml_blocks.q2_k))
Q3KQuantizer = ggml_family("q3_k", GGMLGrid("Q3_K", 3, 16, -4, 3, 31, None, 3.4375, ggml_blocks.q3_k))
Q4KQuantizer = ggml_family("q4_k", GGMLGrid("Q4_K", 4, 32, 0, 15, 63, 63, 4.5, ggml_blocks.q4_k))
Q5KQuantizer = ggml_family("q5_k", GGMLGrid("Q5_K", 5, 32, 0, 31, 63, 63, 5.5, ggml_blocks.q5_k))
Q6KQuantizer = ggml_family("q6_k", GGMLGrid("Q6_K", 6, 16, -32, 31, 127, None, 6.5625, ggml_blocks.q6_k))
IQ4NLQuantizer = ggml_family("iq4_nl", GGMLGrid("IQ4_NL", 4, 32, -127, 113, 0, None, 4.5, ggml_blocks.iq4_nl,
                                                IQ4_NL_VALUES))
Q51Quantizer = ggml_family("q5_1", GGMLGrid("Q5_1", 5, 32, 0, 31, 0, 0, 6.0, ggml_blocks.q5_1))
Q41Quantizer = ggml_family("q4_1", GGMLGrid("Q4_1", 4, 32, 0, 15, 0, 0, 5.0, ggml_blocks.q4_1))
