"""Triton kernels for the ggml block families (Q2_K .. Q6_K, IQ4_NL, IQ4_XS, Q4_1, Q5_1): the per-weight pass.

Bit for bit ``hf_qat.quantizers.kquants`` (tests run them under ``TRITON_INTERPRET=1``). The block scales
are rounded before the kernels, in PyTorch (:func:`~hf_qat.quantizers.kquants.block_scales`: one number per
16 or 32 weights); the kernels do what touches every weight:

* forward: ``r = (w + min) / step`` (IEEE division, ``div_rn``), ``code = clamp(r, lo, hi)`` rounded half to
  even (or, for a table of levels, the nearest level, ties to the even index, as ``reference.nearest_value``),
  ``value = code * step - min`` in fp32, rounded once to the weight's dtype;
* backward, one pass over the gradient: the clipped straight-through weight gradient
  (``grad`` where ``lo <= r <= hi``, else 0) and, per block, the pairwise tree sums (``reference.tree_sum``)
  of ``grad * (code - r inside, code where clipped)`` (the scale's) and of ``-grad where clipped`` (the
  min's, asymmetric types only). ParetoQ's factor and the scale clamp's mask are applied after, in PyTorch.

Nothing is saved between the passes: the backward recomputes ``r`` and the codes from the weight, so a QAT
step keeps no weight-sized temporary. Launches pass ``enable_fp_fusion=False`` (no multiply-add contracted
into an FMA, which would round differently from PyTorch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_qat.quantizers.reference import next_power_of_two

from .triton_weight_quant import OUT_KINDS, _clamp, _nearest_value, _round_half_even, _to_out_dtype, _tree_last


@triton.jit
def _ratio_and_codes(w_ptr, step_ptr, min_ptr, pid_r, pid_c, R, C, N_BLOCKS,
                     BLOCK: tl.constexpr, ASYM: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
                     VALUES: tl.constexpr, N_VALUES: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """The tile's offsets and mask, ``r``, the codes, and each weight's block step and min."""
    rows = (pid_r * BR + tl.arange(0, BR)).to(tl.int64)  # int64 offsets: weights past 2^31 elements
    cols = pid_c * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s_offs = rows[:, None] * N_BLOCKS + cols[None, :] // BLOCK
    step = tl.load(step_ptr + s_offs, mask=mask, other=1.0)
    if ASYM:
        mn = tl.load(min_ptr + s_offs, mask=mask, other=0.0)
        w = w + mn
    else:
        mn = tl.zeros_like(step)
    r = tl.math.div_rn(w, step)
    clamped = _clamp(r, LO, HI)
    if N_VALUES > 0:
        code = _nearest_value(clamped, VALUES, N_VALUES)
    else:
        code = _round_half_even(clamped)
    return rows, mask, offs, r, code, step, mn


@triton.jit
def _ggml_fwd_kernel(w_ptr, step_ptr, min_ptr, out_ptr, R, C, N_BLOCKS,
                     BLOCK: tl.constexpr, ASYM: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
                     VALUES: tl.constexpr, N_VALUES: tl.constexpr, OUT_KIND: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr):
    _, mask, offs, _, code, step, mn = _ratio_and_codes(
        w_ptr, step_ptr, min_ptr, tl.program_id(0), tl.program_id(1), R, C, N_BLOCKS,
        BLOCK, ASYM, LO, HI, VALUES, N_VALUES, BR, BC)
    value = code * step
    if ASYM:
        value = value - mn
    tl.store(out_ptr + offs, _to_out_dtype(value, OUT_KIND), mask=mask)


@triton.jit
def _block_sums(x, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """``x [BR, BC]`` -> ``[BR, BC / BLOCK]``: each block's pairwise tree sum."""
    sums = _tree_last(tl.reshape(x, [BR * (BC // BLOCK), BLOCK]), BR * (BC // BLOCK), BLOCK, LOG2_BLOCK)
    return tl.reshape(sums, [BR, BC // BLOCK])


@triton.jit
def _ggml_bwd_kernel(g_ptr, w_ptr, step_ptr, min_ptr, gw_ptr, gs_ptr, gm_ptr, R, C, N_BLOCKS,
                     BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, ASYM: tl.constexpr, LO: tl.constexpr,
                     HI: tl.constexpr, VALUES: tl.constexpr, N_VALUES: tl.constexpr, NEED_SCALE_GRAD: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows, mask, offs, r, code, _, _ = _ratio_and_codes(
        w_ptr, step_ptr, min_ptr, pid_r, pid_c, R, C, N_BLOCKS, BLOCK, ASYM, LO, HI, VALUES, N_VALUES, BR, BC)
    grad_raw = tl.load(g_ptr + offs, mask=mask, other=0.0)
    inside = (r >= LO) & (r <= HI)
    tl.store(gw_ptr + offs, tl.where(inside, grad_raw, tl.zeros_like(grad_raw)), mask=mask)
    if NEED_SCALE_GRAD:
        g = grad_raw.to(tl.float32)
        bcols = pid_c * (BC // BLOCK) + tl.arange(0, BC // BLOCK)
        out_offs = rows[:, None] * N_BLOCKS + bcols[None, :]
        out_mask = (rows[:, None] < R) & (bcols[None, :] < N_BLOCKS)
        contrib = g * tl.where(inside, code - r, code)
        sums = _block_sums(contrib, BLOCK, LOG2_BLOCK, BR, BC)
        tl.store(gs_ptr + out_offs, sums, mask=out_mask)
        if ASYM:
            contrib = tl.where(inside, 0.0, -g)
            sums = _block_sums(contrib, BLOCK, LOG2_BLOCK, BR, BC)
            tl.store(gm_ptr + out_offs, sums, mask=out_mask)


def _launch(matrix: torch.Tensor, step: torch.Tensor, grid) -> tuple[tuple[int, int], dict]:
    """The launch grid and the constants every kernel takes, for ``matrix [R, C]`` and ``step [R, C / block]``."""
    rows, cols = matrix.shape
    bc = max(grid.block, min(256, next_power_of_two(cols)))
    br = max(1, min(32, 4096 // bc))
    values = tuple(float(v) for v in grid.values)
    return (triton.cdiv(rows, br), triton.cdiv(cols, bc)), dict(
        R=rows, C=cols, N_BLOCKS=step.shape[1], BLOCK=grid.block, ASYM=grid.asymmetric, LO=float(grid.lo),
        HI=float(grid.hi), VALUES=values or (0.0,), N_VALUES=len(values), BR=br, BC=bc, enable_fp_fusion=False)


def ggml_forward(matrix: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor | None, grid) -> torch.Tensor:
    """``matrix [R, C]`` on the grid of ``grid`` (a ``kquants.GGMLGrid``) with the rounded block ``step`` and
    ``minimum`` (fp32 ``[R, C / block]``; None for a symmetric type), in the matrix's dtype."""
    matrix = matrix.contiguous()
    step = step.float().contiguous()
    out = torch.empty_like(matrix)
    launch, constants = _launch(matrix, step, grid)
    _ggml_fwd_kernel[launch](matrix, step, step if minimum is None else minimum.float().contiguous(), out,
                             OUT_KIND=OUT_KINDS[matrix.dtype], **constants)
    return out


def ggml_backward(grad_output: torch.Tensor, matrix: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor | None,
                  grid, need_scale_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(grad of the matrix, per-block sums)``: the sums are fp32 ``[R, G]`` for a symmetric type, ``[R, G, 2]``
    (the scale's, the min's) for an asymmetric one, before ParetoQ's factor; None without ``need_scale_grad``."""
    matrix = matrix.contiguous()
    step = step.float().contiguous()
    grad_matrix = torch.empty_like(grad_output)
    sums = torch.empty((*step.shape, 2 if grid.asymmetric else 1), dtype=torch.float32, device=matrix.device)
    scale_sums, min_sums = sums[..., 0].contiguous(), sums[..., -1].contiguous()
    launch, constants = _launch(matrix, step, grid)
    _ggml_bwd_kernel[launch](grad_output.contiguous(), matrix, step,
                             step if minimum is None else minimum.float().contiguous(), grad_matrix, scale_sums,
                             min_sums, LOG2_BLOCK=grid.block.bit_length() - 1, NEED_SCALE_GRAD=need_scale_grad,
                             **constants)
    if not need_scale_grad:
        return grad_matrix, None
    return grad_matrix, torch.stack([scale_sums, min_sums], -1) if grid.asymmetric else scale_sums
