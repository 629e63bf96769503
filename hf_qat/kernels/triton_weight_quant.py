"""Triton kernels for weight fake quantization: one forward pass, one fused backward pass.

They reproduce ``hf_qat.quantizers.reference`` bit for bit (tests run them under
``TRITON_INTERPRET=1``):

* forward: ``r = w / s_r`` with IEEE division (``div_rn``), the Grid's code rule with
  round-half-even by the 1.5 * 2^23 trick (exact for |x| < 2^22; the clamp comes first), or for a table
  grid (E2M1) ``reference.nearest_magnitude``'s rule as comparisons with the midpoints (the table is a
  constexpr tuple, unrolled), ``step * code`` in fp32, rounded to the weight dtype (bf16 on the fp32
  bit pattern, since the interpreter's bf16 cast truncates).
* backward, one pass over the gradient: the clipped straight-through weight gradient and the scale
  gradient contributions ``grad * factor``, reduced as the reference's pairwise tree: within a group
  for group scales (``[R, n_groups]`` out), within a power-of-two column tile otherwise
  (``[R, n_tiles]`` partial sums, finished by the same tree on the host).

Nothing is saved between the passes: the backward recomputes ``r`` and the codes from the weight.
Launches pass ``enable_fp_fusion=False`` so that no multiply-add is contracted into an FMA, which
would round differently from PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_qat.quantizers.reference import WeightQuantSpec, next_power_of_two, tree_sum

OUT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _round_half_even(x):
    """fp32 round-half-to-even for |x| < 2^22: (x + 1.5 * 2^23) - 1.5 * 2^23.
    A zero result takes the sign of ``x``, as torch.round's does (round(-0.3) is -0.0)."""
    r = (x + 12582912.0) - 12582912.0
    return tl.where(r == 0.0, x * 0.0, r)


@triton.jit
def _to_out_dtype(x, OUT_KIND: tl.constexpr):
    """fp32 -> the output dtype with round-to-nearest-even (0 fp32, 1 fp16, 2 bf16). A NaN becomes the quiet NaN
    0x7FC0 (rounding CUDA's NaN 0x7FFFFFFF would carry into the sign: -0.0); its payload is not the math's."""
    if OUT_KIND == 0:
        return x
    elif OUT_KIND == 1:
        return x.to(tl.float16)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        bits = tl.where(x != x, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _nearest_value(x, VALUES: tl.constexpr, N_VALUES: tl.constexpr):
    """``reference.nearest_value``: the first entry, plus each step whose midpoint ``x`` is not below (not at or
    below when the upper index i + 1 is odd: a tie goes to the even index). A NaN is below nothing: the last
    entry."""
    v = tl.zeros_like(x) + VALUES[0]
    for i in tl.static_range(N_VALUES - 1):
        mid = (VALUES[i] + VALUES[i + 1]) * 0.5
        if (i + 1) % 2 == 0:
            below = x < mid
        else:
            below = x <= mid
        v = tl.where(below, v, v + (VALUES[i + 1] - VALUES[i]))
    return v


@triton.jit
def _clamp(x, LO: tl.constexpr, HI: tl.constexpr):
    """``torch.clamp``: a NaN stays NaN (Triton's default, on CUDA and in the interpreter, returns the bound)."""
    return tl.minimum(tl.maximum(x, LO, propagate_nan=tl.PropagateNan.ALL), HI, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nearest_magnitude(x, MAGS: tl.constexpr, N_MAGS: tl.constexpr):
    """``reference.nearest_magnitude``: the nearest magnitude of ``|x|`` (:func:`_nearest_value`), the sign of
    ``x`` last."""
    m = _nearest_value(tl.abs(x), MAGS, N_MAGS)
    return tl.where(x < 0, -m, m)


@triton.jit
def _codes(r, SIGN: tl.constexpr, CLIP_LO: tl.constexpr, CLIP_HI: tl.constexpr, MUL: tl.constexpr,
           ADD: tl.constexpr, CODE_MUL: tl.constexpr, CODE_ADD: tl.constexpr, MAGS: tl.constexpr,
           N_MAGS: tl.constexpr):
    if SIGN:
        return tl.where(r >= 0, 1.0, -1.0)
    q = _clamp(r, CLIP_LO, CLIP_HI)
    if MUL != 1.0:
        q = q * MUL
    if N_MAGS > 0:
        return _nearest_magnitude(q, MAGS, N_MAGS)
    if ADD != 0.0:
        q = q + ADD
    q = _round_half_even(q)
    if CODE_MUL != 1:
        q = q * CODE_MUL
    if CODE_ADD != 0:
        q = q + CODE_ADD
    return q


@triton.jit
def _tile(w_ptr, s_ptr, step_ptr, pid_r, pid_c, R, C, GROUP_W, scale_row_stride,
          BR: tl.constexpr, BC: tl.constexpr):
    """Offsets, mask, the fp32 weight tile and its (s_r, step) per element."""
    rows = (pid_r * BR + tl.arange(0, BR)).to(tl.int64)  # int64 offsets: weights past 2^31 elements
    cols = pid_c * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s_offs = rows[:, None] * scale_row_stride + cols[None, :] // GROUP_W
    s_r = tl.load(s_ptr + s_offs, mask=mask, other=1.0)
    step = tl.load(step_ptr + s_offs, mask=mask, other=1.0)
    return rows, cols, mask, offs, w, s_r, step


@triton.jit
def _fake_quant_fwd_kernel(
    w_ptr, s_ptr, step_ptr, out_ptr, R, C, GROUP_W, scale_row_stride,
    SIGN: tl.constexpr, CLIP_LO: tl.constexpr, CLIP_HI: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
    CODE_MUL: tl.constexpr, CODE_ADD: tl.constexpr, MAGS: tl.constexpr, N_MAGS: tl.constexpr, OUT_KIND: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows, cols, mask, offs, w, s_r, step = _tile(w_ptr, s_ptr, step_ptr, pid_r, pid_c, R, C, GROUP_W,
                                                 scale_row_stride, BR, BC)
    r = tl.math.div_rn(w, s_r)
    code = _codes(r, SIGN, CLIP_LO, CLIP_HI, MUL, ADD, CODE_MUL, CODE_ADD, MAGS, N_MAGS)
    tl.store(out_ptr + offs, _to_out_dtype(code * step, OUT_KIND), mask=mask)


@triton.jit
def _tree_last(x, ROWS: tl.constexpr, N: tl.constexpr, LOG2: tl.constexpr):
    """Pairwise tree sum over the last axis of ``x [ROWS, N]`` (N = 2**LOG2): adjacent pairs first,
    exactly as ``reference.tree_sum``."""
    for level in tl.static_range(LOG2):
        x = tl.reshape(x, [ROWS, (N >> level) // 2, 2])
        a, b = tl.split(x)
        x = a + b
    return tl.reshape(x, [ROWS])


@triton.jit
def _fake_quant_bwd_kernel(
    g_ptr, w_ptr, s_ptr, step_ptr, gw_ptr, part_ptr, R, C, GROUP_W, scale_row_stride, part_cols,
    SIGN: tl.constexpr, CLIP_LO: tl.constexpr, CLIP_HI: tl.constexpr, MUL: tl.constexpr, ADD: tl.constexpr,
    CODE_MUL: tl.constexpr, CODE_ADD: tl.constexpr, MAGS: tl.constexpr, N_MAGS: tl.constexpr, LEVEL: tl.constexpr,
    GRAD_LO: tl.constexpr, GRAD_HI: tl.constexpr, MASK_LO: tl.constexpr, MASK_HI: tl.constexpr, MASK_ALL: tl.constexpr,
    NEED_SCALE_GRAD: tl.constexpr,
    GROUP_MODE: tl.constexpr, G: tl.constexpr, LOG2_G: tl.constexpr, LOG2_BC: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows, cols, mask, offs, w, s_r, step = _tile(w_ptr, s_ptr, step_ptr, pid_r, pid_c, R, C, GROUP_W,
                                                 scale_row_stride, BR, BC)
    grad_raw = tl.load(g_ptr + offs, mask=mask, other=0.0)
    r = tl.math.div_rn(w, s_r)
    if MASK_ALL:  # nothing is stopped, a NaN ratio included (absmax)
        tl.store(gw_ptr + offs, grad_raw, mask=mask)
    else:
        inside_mask = (r >= MASK_LO) & (r <= MASK_HI)
        tl.store(gw_ptr + offs, tl.where(inside_mask, grad_raw, tl.zeros_like(grad_raw)), mask=mask)
    if NEED_SCALE_GRAD:
        code = _codes(r, SIGN, CLIP_LO, CLIP_HI, MUL, ADD, CODE_MUL, CODE_ADD, MAGS, N_MAGS)
        if SIGN:
            factor = code
        else:
            if LEVEL != 1.0:
                code = code * LEVEL
            factor = tl.where(r < CLIP_LO, GRAD_LO, tl.where(r > CLIP_HI, GRAD_HI, code - r))
        contrib = tl.where(mask, grad_raw.to(tl.float32) * factor, 0.0)
        if GROUP_MODE:
            sums = _tree_last(tl.reshape(contrib, [BR * (BC // G), G]), BR * (BC // G), G, LOG2_G)
            sums = tl.reshape(sums, [BR, BC // G])
            gcols = pid_c * (BC // G) + tl.arange(0, BC // G)
            out_mask = (rows[:, None] < R) & (gcols[None, :] < part_cols)
            tl.store(part_ptr + rows[:, None] * part_cols + gcols[None, :], sums, mask=out_mask)
        else:
            sums = _tree_last(contrib, BR, BC, LOG2_BC)
            tl.store(part_ptr + rows * part_cols + pid_c, sums, mask=rows < R)


def _grid_constants(spec: WeightQuantSpec) -> dict:
    g = spec.grid
    return dict(SIGN=g.sign, CLIP_LO=g.clip_lo, CLIP_HI=g.clip_hi, MUL=g.mul, ADD=g.add, CODE_MUL=g.code_mul,
                CODE_ADD=g.code_add, MAGS=tuple(float(m) for m in g.magnitudes) or (0.0,), N_MAGS=len(g.magnitudes))


def _layout(weight: torch.Tensor, s_r: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(R, C, group width, scale row stride, n_groups) for scales shaped [R or 1, n_groups]."""
    rows, cols = weight.shape
    rows_s, n_groups = s_r.shape
    return rows, cols, cols // n_groups, (n_groups if rows_s == rows else 0), n_groups


def _tiles(cols: int, group_w: int, grouped: bool) -> tuple[int, int]:
    """(BR, BC): BC a power of two no wider than the padded row; a multiple of the group width."""
    if grouped:
        bc = max(group_w, min(256, next_power_of_two(cols)))
    else:
        bc = min(1024, next_power_of_two(cols))
    br = max(1, min(32, 4096 // bc))
    return br, bc


def fake_quant_forward(weight: torch.Tensor, s_r: torch.Tensor, step: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    rows, cols, group_w, row_stride, n_groups = _layout(weight, s_r)
    out = torch.empty_like(weight)
    grouped = n_groups > 1
    br, bc = _tiles(cols, group_w, grouped)
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
    _fake_quant_fwd_kernel[grid](
        weight, s_r.contiguous(), step.contiguous(), out, rows, cols, group_w, row_stride,
        **_grid_constants(spec), OUT_KIND=OUT_KINDS[weight.dtype], BR=br, BC=bc, enable_fp_fusion=False,
    )
    return out


def fake_quant_backward(
    grad_output: torch.Tensor, weight: torch.Tensor, s_r: torch.Tensor, step: torch.Tensor, spec: WeightQuantSpec,
    need_scale_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows, cols, group_w, row_stride, n_groups = _layout(weight, s_r)
    grouped = n_groups > 1
    br, bc = _tiles(cols, group_w, grouped)
    grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
    grad_weight = torch.empty_like(weight)
    part_cols = n_groups if grouped else grid[1]
    partial = torch.empty((rows, part_cols), dtype=torch.float32, device=weight.device) if need_scale_grad else grad_weight
    g = spec.grid
    _fake_quant_bwd_kernel[grid](
        grad_output, weight, s_r.contiguous(), step.contiguous(), grad_weight, partial, rows, cols, group_w,
        row_stride, part_cols, **_grid_constants(spec), LEVEL=g.level, GRAD_LO=g.grad_lo,
        GRAD_HI=g.grad_hi, MASK_LO=g.mask_lo, MASK_HI=g.mask_hi, MASK_ALL=g.mask_lo == -float("inf"),
        NEED_SCALE_GRAD=need_scale_grad,
        GROUP_MODE=grouped, G=group_w if grouped else 1, LOG2_G=(group_w.bit_length() - 1) if grouped else 0,
        LOG2_BC=bc.bit_length() - 1, BR=br, BC=bc, enable_fp_fusion=False,
    )
    if not need_scale_grad:
        return grad_weight, None
    if grouped:
        return grad_weight, partial
    return grad_weight, tree_sum(partial, dim=-1, keepdim=True)
