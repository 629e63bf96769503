"""The PyTorch reference of weight and activation fake quantization: the specification.

The Triton kernels in ``hf_qat.kernels`` must reproduce these functions bit for bit, so every
operation here is spelled out in fp32 in a fixed order:

* Scales (:func:`prepare_scales`, shared by both engines): ``s_r = fp32(dtype(max(s, 1e-5)))`` and
  ``step = fp32(dtype(s_r * level))`` with ``dtype`` the configured scale dtype. The block-scaled
  float families round to their FP8 scale formats instead (:mod:`.block_scales`: E8M0 powers of two;
  E4M3 over a per-tensor power of two) and ``step = s_r * level`` is exact.
* Forward (:func:`fake_quantize_forward`): ``r = w / s_r`` (IEEE division), the Grid's code rule,
  ``value = step * code`` in fp32, cast to the weight dtype. A table grid (E2M1) takes the nearest
  magnitude of ``x = clamp(r, lo, hi) * mul`` (:func:`nearest_magnitude`): exact, with ties to the entry
  of even index, then the sign of ``x`` (a lookup; compiled, and in the Triton kernels, comparisons with the
  midpoints). Non-finite ratios: ``clamp`` keeps a NaN (the kernels ask Triton to propagate it), so a NaN ratio
  stays NaN on an integer grid, takes a table's top level and a sign grid's -1, and its weight gradient is stopped
  (absmax, which masks nothing, passes it); +-inf clip to the ends.
* Backward (:func:`fake_quantize_backward`): the weight gradient is the output gradient where the
  Grid's mask holds (elementwise, exact); the scale gradient sums ``grad * factor`` over each group
  with :func:`tree_sum` (zero-pad to a power of two, then add adjacent pairs level by level), then
  :func:`finish_scale_grad` (shared) sums rows by the same tree for per-tensor scales, multiplies by
  g, zeroes it where the clamp at 1e-5 was active and casts to the scale's dtype.

A fixed-order tree is what makes the reduction reproducible: any kernel that tiles a row into
aligned power-of-two blocks, tree-sums each block and tree-sums the block sums computes exactly the
same additions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .base import SCALE_MIN, Grid, ScaleLayout
from .block_scales import SCALE_DTYPES as BLOCK_SCALE_DTYPES
from .block_scales import round_block_scale

_SCALE_MIN_F32 = float(torch.tensor(SCALE_MIN, dtype=torch.float32))


@dataclass(frozen=True)
class WeightQuantSpec:
    """Everything the fake-quant math of one weight needs (hashable, so kernels can key on it).

    Attributes:
        grid: the family's elementwise rule.
        group_size: int, "channel" or "tensor".
        scale_dtype: the dtype scales are rounded to in the forward pass.
        grad_scale: ParetoQ's g, multiplied into the scale gradient.
        learnable: False for absmax (no scale gradient, scale recomputed from the weight).
        forward: the family's own differentiable forward ``(matrix, scale, grad_scale, engine) -> matrix``
            (:meth:`~.family.Quantizer.own_forward`: the ggml block families'), or None: the engines'.
    """

    grid: Grid
    group_size: int | str
    scale_dtype: torch.dtype
    grad_scale: float
    learnable: bool = True
    forward: Callable[[torch.Tensor, torch.Tensor, float, Any], torch.Tensor] | None = None

    @functools.cached_property
    def layout(self) -> ScaleLayout:
        """Built once per spec (the spec is frozen; the cache lives in the instance's __dict__)."""
        return ScaleLayout(self.group_size)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tree_sum(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Sum along ``dim`` as a pairwise tree: zero-pad to a power of two, add adjacent pairs.

    ``[a, b, c]`` sums as ``(a + b) + (c + 0)``. Deterministic, and reproducible by any engine that
    tree-sums aligned power-of-two blocks and then tree-sums the block sums.
    """
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    width = next_power_of_two(n)
    if width != n:
        x = torch.nn.functional.pad(x, (0, width - n))
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    out = x.movedim(-1, dim)
    return out if keepdim else out.squeeze(dim)


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``x`` rounded (to nearest even) to ``dtype`` and back to fp32."""
    return x.to(dtype).to(torch.float32)


def prepare_scales(scale: torch.Tensor, grid: Grid, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s_r, step)``, both fp32 and shaped like ``scale``: the rounded scale that divides the weight
    and the rounded step that multiplies the integer code."""
    scale = scale.detach().float().clamp(min=SCALE_MIN)
    if scale_dtype in BLOCK_SCALE_DTYPES:
        s_r = round_block_scale(scale, scale_dtype)
        return s_r, s_r * grid.level  # exact: an FP8 value times powers of two
    s_r = round_to_dtype(scale, scale_dtype)
    step = s_r if grid.level == 1.0 else round_to_dtype(s_r * grid.level, scale_dtype)
    return s_r, step


def _ratio(weight: torch.Tensor, s_r: torch.Tensor, layout: ScaleLayout) -> torch.Tensor:
    """``r = w / s_r`` as a new fp32 tensor ``[R, n_groups, G]``."""
    return torch.div(layout.group_view(weight.float()), s_r.unsqueeze(-1))


def nearest_entry(x: float, table: tuple[int, ...]) -> int:
    """The rule, for one number: the entry of the ascending table nearest to ``x``, a tie between entries
    i and i + 1 going to the one of even index (round half to even on the table, as IEEE rounds)."""
    return table[min(range(len(table)), key=lambda i: (abs(table[i] - x), i % 2))]


@functools.lru_cache(maxsize=None)
def _lookup_table(table: tuple[int, ...], signed: bool, device: str) -> torch.Tensor:
    """fp32 ``[4 * (hi - lo) + 1]`` on ``device`` for :func:`_lookup_`: entry ``j`` is the level of every ``x``
    with ``floor(2x) + ceil(2x) = 4 lo + j`` (``x = lo + j / 4`` when ``j`` is even; strictly between two
    halves, where no tie can fall, when odd). ``signed``: ``table`` holds magnitudes and the level is the
    nearest one to ``|x|``, negated where ``x < 0`` (-0.0 there when it is 0)."""
    lo, hi = (-table[-1], table[-1]) if signed else (table[0], table[-1])
    levels = []
    for j in range(4 * (hi - lo) + 1):
        x = lo + j / 4
        level = nearest_entry(abs(x), table) if signed else nearest_entry(x, table)
        levels.append(-float(level) if signed and x < 0 else float(level))
    return torch.tensor(levels, dtype=torch.float32, device=device)


def _lookup_(x: torch.Tensor, table: tuple[int, ...], signed: bool) -> torch.Tensor:
    """The level of every ``x`` (fp32; clamped to the table's range first), computed in place: ``x`` is
    overwritten (with the levels; where it is not contiguous it holds intermediates and the levels come in a new
    tensor): use what it returns. Every midpoint of two integers is a multiple of 1/2, so which entry is
    nearest, ties included, depends only on ``floor(2x)`` and on whether ``2x`` is an integer: ``floor(2x) +
    ceil(2x)`` indexes a table of the rule's answers (:func:`_lookup_table`). Doubling, floor and ceil are exact
    in fp32. Two temporaries (the floor and the integer index): on a CPU each fresh tensor of a weight's size is
    one more pass over memory out of cache (and, with glibc's default allocator, its page faults). No gradient
    flows through a lookup. Traced (the compiled engine, a model compiled whole), the same rule as comparisons
    (:func:`_lookup_by_midpoints`)."""
    if torch.compiler.is_compiling():
        return _lookup_by_midpoints(x, table, signed)
    x = x.detach()  # the same storage; written through ``out=``, which autograd refuses on a tensor needing grad
    levels = _lookup_table(tuple(table), signed, str(x.device))
    lo, hi = (-table[-1], table[-1]) if signed else (table[0], table[-1])
    twice = x.mul_(2.0).clamp_(2 * lo, 2 * hi).nan_to_num_(2 * hi)  # NaN: the top level
    index = torch.floor(twice).add_(twice.ceil_()).sub_(4 * lo).to(torch.int32).reshape(-1)  # integers: exact
    if not x.is_contiguous():  # a view of a transposed matrix (export's checks)
        return torch.index_select(levels, 0, index).view(x.shape)
    return torch.index_select(levels, 0, index, out=x.view(-1)).view(x.shape)


def _lookup_by_midpoints(x: torch.Tensor, table: tuple[int, ...], signed: bool) -> torch.Tensor:
    """:func:`_lookup_`'s levels, bit for bit, as comparisons with the midpoints of adjacent entries: the first
    entry, plus each step whose midpoint ``x`` is not below (not at or below when the upper index is odd, so that
    a tie goes to the even index); NaN, below nothing, is past every midpoint: the last entry. ``signed``: of
    ``|x|``, negated where ``x < 0``. Compiled, one vectorised compare and select per entry, where a gather from
    the table runs element by element (docs/figures.md); the Triton kernels compare with the same midpoints."""
    key = x.abs() if signed else x
    level = torch.full_like(key, float(table[0]), dtype=torch.float32)
    for i in range(len(table) - 1):
        middle = (table[i] + table[i + 1]) / 2
        past = ~(key < middle) if (i + 1) % 2 == 0 else ~(key <= middle)
        level = torch.where(past, level + float(table[i + 1] - table[i]), level)
    return torch.where(x < 0, -level, level) if signed else level


def nearest_value(x: torch.Tensor, table: tuple[int, ...]) -> torch.Tensor:
    """The entry of the ascending integer table ``table`` nearest to ``x`` (fp32), a tie between entries
    i and i + 1 going to the even index (:func:`nearest_entry`); ``x`` outside the table's range gives its
    nearest end, NaN the last entry. A new tensor, computed by one lookup per element (:func:`_lookup_`)."""
    return nearest_value_(x.detach().float().clone(memory_format=torch.contiguous_format), table)


def nearest_value_(x: torch.Tensor, table: tuple[int, ...]) -> torch.Tensor:
    """:func:`nearest_value` of an fp32 ``x`` that is the caller's to overwrite (the result is ``x`` itself, or,
    traced or where ``x`` is not contiguous, a new tensor: use what it returns)."""
    return _lookup_(x, table, signed=False)


def nearest_magnitude(x: torch.Tensor, magnitudes: tuple[int, ...]) -> torch.Tensor:
    """``sign(x) * m`` with ``m`` the entry of the ascending table ``magnitudes`` (integers from 0) nearest
    to ``|x|`` (ties to the even index): ``-m`` where ``x < 0`` (so -0.0 for a negative ``x`` nearest to 0, +0.0
    for -0.0). fp32, a new tensor."""
    return nearest_magnitude_(x.detach().float().clone(memory_format=torch.contiguous_format), magnitudes)


def nearest_magnitude_(x: torch.Tensor, magnitudes: tuple[int, ...]) -> torch.Tensor:
    """:func:`nearest_magnitude` of an fp32 ``x`` that is the caller's to overwrite (as :func:`nearest_value_`)."""
    return _lookup_(x, magnitudes, signed=True)


def _codes_(q: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Turn ``q = clamp(r, clip_lo, clip_hi)`` (overwritten: use what it returns) into the codes of a
    non-sign grid. Multiplications by 1 and additions of 0 are not performed (so -0.0 stays
    -0.0)."""
    if grid.mul != 1.0:
        q.mul_(grid.mul)
    if grid.magnitudes:
        return nearest_magnitude_(q, grid.magnitudes)
    if grid.add != 0.0:
        q.add_(grid.add)
    q.round_()
    if grid.code_mul != 1:
        q.mul_(grid.code_mul)
    if grid.code_add != 0:
        q.add_(grid.code_add)
    return q


def grid_codes(r: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The integer code of every ``r`` (a new fp32 tensor holding integers)."""
    if grid.sign:
        return torch.where(r >= 0, 1.0, -1.0)
    return _codes_(r.clamp(grid.clip_lo, grid.clip_hi), grid)


def fake_quantize_forward(
    weight: torch.Tensor, s_r: torch.Tensor, step: torch.Tensor, grid: Grid, layout: ScaleLayout
) -> torch.Tensor:
    """The fake-quantized weight ``step * code`` in the weight's dtype, shaped like ``weight``."""
    r = _ratio(weight, s_r, layout)
    codes = torch.where(r >= 0, 1.0, -1.0) if grid.sign else _codes_(r.clamp_(grid.clip_lo, grid.clip_hi), grid)
    return codes.mul_(step.unsqueeze(-1)).reshape(weight.shape).to(weight.dtype)


def clipped_factor_is_code(grid: Grid) -> bool:
    """Whether the scale-gradient factor where ``r`` is clipped (``grad_lo`` / ``grad_hi``) equals the clipped
    code times ``level`` (LSQ, absmax, SEQ 2-bit, the E2M1 table; not ternary SEQ): then ``code * level - (r
    inside, 0 where clipped)`` is the whole factor, with no fill of its own."""
    if grid.sign:
        return False
    return (grid.codes[0] * grid.level, grid.codes[-1] * grid.level) == (grid.grad_lo, grid.grad_hi)


def fake_quantize_backward(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    s_r: torch.Tensor,
    step: torch.Tensor,
    grid: Grid,
    layout: ScaleLayout,
    need_scale_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(grad_weight, group_sums)``: the clipped straight-through weight gradient (weight dtype) and,
    when asked, ``sum(grad * factor)`` per row and group, fp32 ``[R, n_groups]``."""
    r = _ratio(weight, s_r, layout)
    if grid.sign:
        stopped = ~((r >= grid.mask_lo) & (r <= grid.mask_hi))
        clamped = None
    else:
        clamped = r.clamp(grid.clip_lo, grid.clip_hi)
        outside = clamped != r  # r < lo or r > hi (or NaN)
        if grid.mask_lo == -float("inf"):
            stopped = None
        elif (grid.mask_lo, grid.mask_hi) == (grid.clip_lo, grid.clip_hi):
            stopped = outside
        else:
            stopped = ~((r >= grid.mask_lo) & (r <= grid.mask_hi))
    grad_weight = grad_output if stopped is None else grad_output.masked_fill(stopped.view(weight.shape), 0)
    if not need_scale_grad:
        return grad_weight, None
    if grid.sign:
        factor = torch.where(r >= 0, 1.0, -1.0)
    else:
        factor = _codes_(clamped, grid)
        if grid.level != 1.0:
            factor.mul_(grid.level)
        if clipped_factor_is_code(grid):  # code * level - r inside, code * level where clipped
            # A table's lookup gives a NaN r a level: its NaN must reach the factor through r, so only r past an
            # end is zeroed there (an integer grid's code is NaN already)
            clipped = (r < grid.clip_lo).logical_or_(r > grid.clip_hi) if grid.magnitudes else outside
            factor.sub_(r.masked_fill_(clipped, 0.0))
        else:
            factor.sub_(r)  # code * level - r inside the clip range
            factor.masked_fill_(r < grid.clip_lo, grid.grad_lo).masked_fill_(r > grid.clip_hi, grid.grad_hi)
    factor.mul_(layout.group_view(grad_output.float()))
    return grad_weight, tree_sum(factor, dim=-1)


def finish_scale_grad(group_sums: torch.Tensor, scale: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """Shared by both engines: ``[R, n_groups]`` group sums -> the gradient of ``scale`` (its dtype).

    Per-tensor scales (one row) tree-sum the rows; then ``* g`` and the clamp's zero gradient below
    1e-5.
    """
    if scale.shape[0] == 1 and group_sums.shape[0] > 1:
        group_sums = tree_sum(group_sums, dim=0, keepdim=True)
    grad = group_sums * float(torch.tensor(grad_scale, dtype=torch.float32))  # g rounded to fp32 first
    grad.masked_fill_(scale.detach().float() < _SCALE_MIN_F32, 0.0)
    return grad.to(scale.dtype)


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, spec: WeightQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [R, C], step fp32 [scale shape])``: what export packs. ``step * codes`` equals
    :func:`fake_quantize_weight` exactly (in fp32)."""
    s_r, step = prepare_scales(scale, spec.grid, spec.scale_dtype)
    codes = grid_codes(_ratio(weight.detach(), s_r, spec.layout), spec.grid)
    return codes.reshape(weight.shape).to(torch.int8), step


def fake_quantize_weight(weight: torch.Tensor, scale: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Forward only, end to end in PyTorch (export checks, metrics, tests)."""
    s_r, step = prepare_scales(scale, spec.grid, spec.scale_dtype)
    return fake_quantize_forward(weight, s_r, step, spec.grid, spec.layout)


# Clipping ratios tried by :func:`mse_scale`, 1.0 first (ties keep the larger scale): 0.30 .. 1.00 by 0.02.
MSE_SCALE_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(36))


@torch.no_grad()
def mse_scale(weight: torch.Tensor, first_scale: torch.Tensor, spec: WeightQuantSpec,
              ratios: tuple[float, ...] = MSE_SCALE_RATIOS, importance: torch.Tensor | None = None) -> torch.Tensor:
    """The clipped scale: for every scale (group, row or tensor), the candidate ``ratio * first_scale``
    whose fake-quantized weights (:func:`fake_quantize_weight`, scale-dtype rounding included) have
    the least squared error ``sum (Q(w) - w)^2`` over the weights that scale covers.

    weight ``[R, C]`` (any float dtype; the error is taken in fp32), first_scale fp32 ``scale shape``
    (the family's first scale, e.g. max|w| / Qp) -> fp32 ``scale shape``. Ratios are tried in the
    given order and a later ratio wins only with a strictly smaller error. Clipping trades a larger
    error on the few largest weights for a finer step on all the others (GPTQ/AWQ-style clip search,
    llama.cpp's quantizers do the same for their scales). ``importance`` (fp32 ``[C]``, e.g. the mean squared
    activation of each input column: :mod:`hf_qat.model.importance`) weights each column's error, as llama.cpp's
    importance matrix does: the search then minimises the error of the layer's output, not of its weights.
    """
    w = weight.float()
    weights = 1.0 if importance is None else importance.float().to(w.device)

    def squared_error(scale: torch.Tensor) -> torch.Tensor:
        return spec.layout.scale_view((fake_quantize_weight(w, scale, spec).float() - w).pow(2) * weights).sum(-1)

    best_scale = first_scale.float() * ratios[0]
    best_error = squared_error(best_scale)
    for ratio in ratios[1:]:
        candidate = first_scale.float() * ratio
        error = squared_error(candidate)
        better = error < best_error
        best_scale = torch.where(better, candidate, best_scale)
        best_error = torch.where(better, error, best_error)
    return best_scale


# ---------------------------------------------------------------------------------------- activations
ACTIVATION_QMAX = 127.0


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 scale ``127 / max(max|x|, 1e-5)`` over the last dim, fp32 ``[..., 1]``.

    Written as ``reciprocal(m) * 127`` (what ``127 / m`` evaluates to in PyTorch, and so in
    transformers' BitNet layers), so that a BitNet export reproduces it.
    """
    return x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5).reciprocal() * ACTIVATION_QMAX


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """int8 per-token dynamic fake quantization: ``clamp(round(x * a), -128, 127) / a`` in fp32,
    cast back to ``x.dtype`` (the straight-through gradient is the identity)."""
    scale = activation_scale(x)
    q = x.float() * scale  # then in place: an activation-sized temporary is one more per Linear in the forward
    return q.round_().clamp_(-128.0, 127.0).div_(scale).to(x.dtype)
