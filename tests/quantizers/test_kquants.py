"""The ggml block families (q2_k .. q6_k, iq4_nl, q5_1): the forward is ggml's dequantizer of the codes
(gguf-py's ``dequantize`` of the packed blocks, an independent implementation), the scale rounding is
restated here block by block, the gradients are the straight-through ones, and bad settings are refused."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from hf_qat import QATConfig
from hf_qat.errors import QATConfigError, QATModelError
from hf_qat.llamacpp.file_types import BLOCK
from hf_qat.quantizers.ggml_blocks import pack_ggml
from hf_qat.quantizers import ScaleLayout, get_quantizer
from hf_qat.quantizers.kquants import GRIDS, GGMLFakeQuant, block_scales, ggml_codes, ggml_fake_quantize
from hf_qat.kernels.dispatch import TorchEngine
from hf_qat.model.unit import WeightQuantizer

BITS = {"q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6, "iq4_nl": 4, "iq4_xs": 4, "q4_1": 4, "q5_1": 5}


def learned_scale(name: str, w: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The family's first scale, moved as training would move it (x exp(N(0, 0.3)))."""
    grid = GRIDS[name]
    first = get_quantizer(name, BITS[name]).init_scale(ScaleLayout(grid.block).scale_view(w))
    return first * torch.exp(torch.randn(first.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_forward_is_what_ggml_dequantizes_from_the_packed_blocks(name):
    torch.manual_seed(0)
    w = torch.randn(6, 512) * 0.03
    w[0, :40] = 0.0  # a zero block, and a block of positive weights (min 0)
    w[1, :32] = w[1, :32].abs() + 0.01
    scale = learned_scale(name, w)
    fq = ggml_fake_quantize(w, scale, GRIDS[name])
    codes, scales = ggml_codes(w, scale, GRIDS[name])
    raw = pack_ggml(codes, scales, GRIDS[name])
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[GRIDS[name].ggml_type]]  # ggml's own table
    assert (GRIDS[name].super_block, GRIDS[name].block_bytes) == (block, size)
    assert raw.shape == (6, 512 // block * size)
    back = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, GRIDS[name].ggml_type))
    assert np.array_equal(back, fq.numpy())
    assert codes.min() >= GRIDS[name].lo and codes.max() <= GRIDS[name].hi
    if GRIDS[name].values:
        assert set(codes.unique().tolist()) <= set(GRIDS[name].values)
    assert float(((fq - w) ** 2).sum() / (w ** 2).sum()) < 0.5  # a quantizer (jittered scales), not noise


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_each_family_pickles(name):
    """A family (and so a model holding its units) survives pickle: its class is bound to its name in its module."""
    import pickle

    quantizer = get_quantizer(name, BITS[name])
    back = pickle.loads(pickle.dumps(quantizer))
    assert type(back) is type(quantizer) and back.bits == quantizer.bits


def test_block_sizes_are_ggmls():
    """llama.cpp's block table (what its type rule and the families read) agrees with gguf-py's, type by type."""
    for qtype, weights in BLOCK.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0] == weights, qtype


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "q2_k", "q3_k"])
def test_block_scale_rounding_restated(name):
    """d = fp16(max s / scale_max) per super-block, sc = clamp(round(s / d), 1, scale_max), step = d * sc;
    mins alike from 0: restated with a loop over super-blocks."""
    grid = GRIDS[name]
    w = torch.randn(3, 512) * 0.02
    scale = learned_scale(name, w, seed=3)
    got = block_scales(scale, grid)
    per = grid.blocks_per_super
    for row in range(3):
        for sb in range(512 // grid.super_block):
            blocks = slice(sb * per, (sb + 1) * per)
            s = (scale[row, blocks, 0] if grid.asymmetric else scale[row, blocks]).double()
            d = float(np.float16(s.max().item() / grid.scale_max))
            assert got.d[row, sb].item() == d
            for j, sj in enumerate(s.tolist()):
                sc = min(max(round(sj / d), 1), grid.scale_max)
                assert got.sc[row, sb * per + j].item() == sc
                assert got.step[row, sb * per + j].item() == np.float32(d * sc)
            if grid.asymmetric:
                m = scale[row, blocks, 1].double()
                dmin = float(np.float16(m.max().item() / grid.min_max))
                assert got.dmin[row, sb].item() == dmin
                for j, mj in enumerate(m.tolist()):
                    assert got.mq[row, sb * per + j].item() == min(max(round(mj / dmin), 0), grid.min_max)


def test_codes_round_half_to_even_and_iq4_nl_takes_the_nearest_level():
    grid = GRIDS["iq4_nl"]
    w = torch.tensor([[-127.0, -115.5, -115.6, 0.0, 0.5, 7.0, 7.1, 113.0, 200.0] + [0.0] * 23])
    scale = torch.ones(1, 1)  # d = 1: the ratio is the weight
    codes, _ = ggml_codes(w, scale, grid)
    # -115.5 is the midpoint of -127 (index 0) and -104 (index 1): the tie goes to the even index
    assert codes[0, :9].tolist() == [-127, -127, -127, 1, 1, 1, 13, 113, 113]
    grid6 = GRIDS["q6_k"]
    scale6 = torch.full((1, 16), 1.0)
    step = block_scales(scale6, grid6).step[0, 0]  # fp16(1 / 127) * 127, not 1
    w6 = torch.cat([step * torch.tensor([0.5, 1.5, 2.5, -0.5, 40.0, -40.0]), torch.zeros(250)]).view(1, 256)
    codes6, _ = ggml_codes(w6, scale6, grid6)
    assert codes6[0, :6].tolist() == [0, 2, 2, 0, 31, -32]


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "iq4_nl", "q2_k"])
def test_gradients_are_those_of_the_straight_through_surrogate(name):
    """Autograd through an independent surrogate, ``value = step' * q' - min'`` where every rounding is
    ``x + (rounded - x).detach()`` (step' = s + (step - s).detach(), min' likewise, q' = clamp(r) + (code -
    clamp(r)).detach()), gives the gradients GGMLFakeQuant writes (the scale's times g)."""
    grid = GRIDS[name]
    torch.manual_seed(1)
    w = (torch.randn(4, 256) * 0.03).requires_grad_()
    scale = learned_scale(name, w.detach(), seed=1).requires_grad_()
    g_out = torch.randn(4, 256)
    GGMLFakeQuant.apply(w, scale, grid, 0.5, TorchEngine()).backward(g_out)  # the reference passes

    w2, scale2 = w.detach().clone().requires_grad_(), scale.detach().clone().requires_grad_()
    rounded = block_scales(scale2, grid)
    s = scale2[..., 0] if grid.asymmetric else scale2
    step = (s + (rounded.step - s).detach()).unsqueeze(-1)
    minimum = 0.0 if not grid.asymmetric else (scale2[..., 1] + (rounded.min - scale2[..., 1]).detach()).unsqueeze(-1)
    r = (w2.view(4, -1, grid.block) + minimum) / step
    clamped = r.clamp(grid.lo, grid.hi)
    codes = ggml_codes(w2.detach(), scale2.detach(), grid)[0].float().view(4, -1, grid.block)
    value = step * (clamped + (codes - clamped).detach()) - minimum
    value.view(4, 256).backward(g_out)
    assert torch.equal(w.grad == 0, w2.grad == 0)  # passed inside the range, blocked where clipped
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-6, atol=0)  # (step * (1 / step) is 1 within rounding)
    # the surrogate's step * (1 / step) - 1 and (code - r) carry fp32 rounding that a block sum can cancel into
    torch.testing.assert_close(scale.grad, scale2.grad * 0.5, rtol=1e-4, atol=1e-4 * float(scale.grad.abs().max()))
    inside = (r.detach() >= grid.lo) & (r.detach() <= grid.hi)
    assert bool((~inside).any()) or name == "q6_k"  # the clipped branch is exercised (jittered scales)


def test_unit_learns_a_scale_and_min_pair_and_bakes_exactly():
    w = torch.nn.Parameter(torch.randn(8, 256) * 0.05)
    unit = WeightQuantizer(get_quantizer("q4_k", 4), w, group_size=32, scale_dtype="float16",
                           scale_grad_mode="paretoq", name="layer")
    assert unit.log_scale_ratio.shape == (8, 8, 2)
    out = unit.fake_quantize(w)
    out.pow(2).sum().backward()
    assert unit.log_scale_ratio.grad.abs().sum() > 0 and w.grad.abs().sum() > 0
    assert torch.equal(unit.quantized(w.detach()), out.detach())
    codes, step = unit.codes(w.detach())
    assert codes.shape == (8, 256) and step.shape == (8, 8)


def test_bad_settings_are_refused():
    with pytest.raises(QATConfigError, match="group_size"):
        QATConfig(bits=4, method="q4_k", group_size=64)
    with pytest.raises(QATConfigError, match="bits"):
        QATConfig(bits=4, method="q6_k")
    assert QATConfig(bits=6, method="q6_k").group_size == 16
    w = torch.nn.Parameter(torch.randn(8, 576))  # SmolLM2's width: not a multiple of 256
    with pytest.raises(QATModelError, match="256"):
        WeightQuantizer(get_quantizer("q4_k", 4), w, group_size=32, scale_dtype="float16", scale_grad_mode="paretoq",
                        name="model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "q3_k"])
def test_mse_scale_init_never_loses_to_the_first_scale_per_super_block_and_wins_overall(name):
    from hf_qat.quantizers.kquants import ggml_mse_scale

    grid = GRIDS[name]
    torch.manual_seed(2)
    w = torch.randn(16, 512) * 0.02
    w.view(-1)[::97] *= 6  # a few outliers: clipping them pays
    first = get_quantizer(name, BITS[name]).init_scale(ScaleLayout(grid.block).scale_view(w))
    chosen = ggml_mse_scale(w, first, grid)

    def super_block_error(scale):
        return ((ggml_fake_quantize(w, scale, grid) - w) ** 2).view(16, -1, grid.super_block).sum(-1)

    assert bool((super_block_error(chosen) <= super_block_error(first)).all())  # never worse, super-block-wise
    assert super_block_error(chosen).sum() < 0.99 * super_block_error(first).sum()
    ratio = (chosen / first)
    assert bool(((ratio > 0.29) & (ratio <= 1.0)).all()) and bool((ratio < 1.0).any())
