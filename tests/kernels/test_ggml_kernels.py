"""The ggml block families' Triton kernels against the math, bit for bit (interpreted on CPU, compiled on GPU)."""

from __future__ import annotations

import pytest
import torch

from hf_qat.quantizers.kquants import GRIDS, block_scales, ggml_fake_quantize
from hf_qat.quantizers.reference import nearest_value, tree_sum
from helpers import bits_of

triton = pytest.importorskip("triton")
from hf_qat.kernels.triton_ggml import ggml_backward, ggml_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# rows, columns: odd rows, rows that do not fill a tile, rows wider than a tile (768: three tiles of 256),
# and 96 (a tile of 128 the row does not fill) for the types without super-blocks
SHAPES = [(3, 256), (5, 768), (33, 256), (4, 96)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def case(name: str, rows: int, cols: int, dtype, seed: int = 0):
    grid = GRIDS[name]
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    weight[0, 1] = 0.5  # an outlier: the other weights of its block clip once the scale shrinks
    weight[-1, -grid.block:] = 0.0  # a zero block
    weight = weight.to(dtype)
    blocks = weight.float().reshape(rows, cols // grid.block, grid.block)
    if grid.asymmetric:
        m = (-blocks.amin(-1)).clamp_min(1e-5)
        scale = torch.stack([(blocks.amax(-1) + m) / grid.hi, m], -1)
    else:
        scale = blocks.abs().amax(-1).clamp_min(1e-5) / grid.hi
    scale = scale * (0.6 + 0.8 * torch.rand(scale.shape, generator=gen))  # some weights clip, some do not
    grad = torch.randn(rows, cols, generator=gen).to(dtype)
    return grid, weight.to(DEVICE), scale.to(DEVICE), grad.to(DEVICE)


def restated_backward(grad, weight, scales, grid):
    """The straight-through gradients, written out: the weight's where ``lo <= r <= hi``; per block, the tree
    sums of ``g * (code - r inside, code clipped)`` and of ``-g clipped``."""
    rows, cols = weight.shape
    w = weight.float().reshape(rows, -1, grid.block)
    if grid.asymmetric:
        w = w + scales.min.unsqueeze(-1)
    r = w / scales.step.unsqueeze(-1)
    inside = (r >= grid.lo) & (r <= grid.hi)
    clamped = r.clamp(grid.lo, grid.hi)
    code = nearest_value(clamped, grid.values) if grid.values else torch.round(clamped)
    g = grad.reshape(rows, -1, grid.block)
    grad_weight = torch.where(inside, g, torch.zeros((), dtype=g.dtype)).reshape(rows, cols)
    g = g.float()
    sums = tree_sum(g * torch.where(inside, code - r, code), dim=-1)
    if grid.asymmetric:
        sums = torch.stack([sums, tree_sum(torch.where(inside, 0.0, -g), dim=-1)], -1)
    return grad_weight, sums


@pytest.mark.parametrize("name,rows,cols", [(name, rows, cols) for name in sorted(GRIDS) for rows, cols in SHAPES
                                             if cols % GRIDS[name].super_block == 0])  # a row is whole super-blocks
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_gradients_are_bit_exact(name, rows, cols, dtype):
    grid, weight, scale, grad = case(name, rows, cols, dtype)
    scales = block_scales(scale, grid)
    out = ggml_forward(weight, scales.step, scales.min, grid)
    assert out.dtype == dtype
    assert torch.equal(bits_of(out), bits_of(ggml_fake_quantize(weight, scale, grid)))
    want_weight, want_sums = restated_backward(grad, weight, scales, grid)
    got_weight, got_sums = ggml_backward(grad, weight, scales.step, scales.min, grid, True)
    assert torch.equal(bits_of(got_weight), bits_of(want_weight))
    assert torch.equal(bits_of(got_sums), bits_of(want_sums))
    clipped = ~torch.isclose(want_weight.float(), grad.float())
    assert clipped.any() and not clipped.all()  # the case reaches both branches of the straight-through mask
    got_weight_only, none = ggml_backward(grad, weight, scales.step, scales.min, grid, False)
    assert none is None and torch.equal(bits_of(got_weight_only), bits_of(want_weight))


def tie_case(grid, rows: int, cols: int, seed: int = 0):
    """Weights placed exactly where rounding must break a tie: half-way between two integer codes, or on the
    midpoint of two neighbouring levels of a table grid, some of them -0.0, from the block scales as stored."""
    gen = torch.Generator().manual_seed(seed)
    blocks = cols // grid.block
    shape = (rows, blocks, 2) if grid.asymmetric else (rows, blocks)
    scale = torch.rand(shape, generator=gen) * 0.02 + 0.005
    if grid.asymmetric:
        scale[..., 1] = torch.rand(shape[:-1], generator=gen) * 0.01
    scales = block_scales(scale, grid)
    if grid.values:
        levels = torch.tensor(grid.values, dtype=torch.float32)
        ties = (levels[1:] + levels[:-1]) / 2  # midpoints of neighbouring levels
    else:
        ties = torch.arange(grid.lo, grid.hi, dtype=torch.float32) + 0.5
    r = ties[torch.randint(len(ties), (rows, blocks, grid.block), generator=gen)]
    w = r * scales.step.unsqueeze(-1)
    if grid.asymmetric:
        w = w - scales.min.unsqueeze(-1)
    weight = w.reshape(rows, cols)
    weight[0, :4] = -0.0
    return weight.to(DEVICE), scale.to(DEVICE), scales, r


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_exact_ties_and_negative_zero_round_as_the_reference_does(name):
    grid = GRIDS[name]
    cols = max(grid.super_block, 256)
    weight, scale, scales, ties = tie_case(grid, 4, cols)
    back = weight.cpu().float().reshape(4, -1, grid.block) + (scales.min.unsqueeze(-1) if grid.asymmetric else 0)
    on_tie = back / scales.step.unsqueeze(-1) == ties
    assert on_tie.float().mean() > 0.5  # most weights sit exactly on a tie (the rest lost it to fp32 rounding)
    steps = block_scales(scale, grid)
    out = ggml_forward(weight, steps.step, steps.min, grid)
    assert torch.equal(bits_of(out), bits_of(ggml_fake_quantize(weight, scale, grid)))
    grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want_weight, want_sums = restated_backward(grad, weight, steps, grid)
    got_weight, got_sums = ggml_backward(grad, weight, steps.step, steps.min, grid, True)
    assert torch.equal(bits_of(got_weight), bits_of(want_weight))
    assert torch.equal(bits_of(got_sums), bits_of(want_sums))
