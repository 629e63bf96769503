"""The PyTorch engine: its backward by slices of rows equals the reference's on the whole matrix bit for bit,
and the table lookups equal the nearest-level rule restated here."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from hf_qat.bits import TERNARY_BITS
from hf_qat.kernels import dispatch
from hf_qat.kernels.dispatch import TorchEngine
from hf_qat.quantizers import ScaleLayout, get_quantizer
from hf_qat.quantizers.kquants import GRIDS, IQ4_NL_VALUES, block_scales, ggml_backward_pass
from hf_qat.quantizers.reference import (
    WeightQuantSpec,
    _lookup_by_midpoints,
    fake_quantize_backward,
    nearest_magnitude,
    nearest_value,
    prepare_scales,
)
from helpers import bits_of


def brute_nearest(x: float, table: tuple[int, ...]) -> float:
    """Independently: the nearest entry, a tie to the entry of even index; beyond the ends the end."""
    distances = [abs(t - x) for t in table]
    best = min(distances)
    candidates = [i for i, d in enumerate(distances) if d == best]
    return float(table[next((i for i in candidates if i % 2 == 0), candidates[0])])


def table_probes(table: tuple[int, ...]) -> torch.Tensor:
    """Every quarter of the table's range and a little beyond (each midpoint, each tie), the fp32 neighbours of
    each, random values, the infinities and NaN."""
    lo, hi = min(table[0], -table[-1]), table[-1]
    quarters = torch.arange(4 * (lo - 2), 4 * (hi + 2) + 1) / 4.0
    inf = torch.tensor(float("inf"))
    return torch.cat([quarters, torch.nextafter(quarters, inf), torch.nextafter(quarters, -inf),
                      torch.randn(2000, generator=torch.Generator().manual_seed(0)) * hi,
                      torch.tensor([float("inf"), -float("inf"), -0.0, float("nan")])])


class Traced:
    """A lookup as the compiled engine runs it: traced by dynamo, which takes the comparisons with the midpoints,
    and run by the "eager" backend (no C++ compiler needed: only the traced math is under test); ``frames``
    counts the frames dynamo compiled, so that a silent fallback to eager fails the test."""

    def __init__(self, fn):
        self.counter = torch._dynamo.testing.CompileCounter()
        self.fn = torch.compile(fn, backend=self.counter, fullgraph=True)

    def __call__(self, *args):
        return self.fn(*args)


def midpoints(signed: bool):
    """``_lookup_by_midpoints`` called directly, eagerly."""
    return lambda x, table: _lookup_by_midpoints(x, table, signed)


def brute_nearest_of(x: torch.Tensor, table: tuple[int, ...]) -> torch.Tensor:
    """Elementwise :func:`brute_nearest`, NaN giving the last entry (an infinity, the end on its side)."""
    return torch.tensor([float(table[-1]) if v != v else brute_nearest(min(max(v, table[0] - 1), table[-1] + 1), table)
                         for v in x.tolist()])


@pytest.mark.parametrize("path", ["eager", "traced", "midpoints"])
@pytest.mark.parametrize("table", [IQ4_NL_VALUES, (0, 1, 2, 3, 4, 6, 8, 12), (-4, -1, 0, 5)], ids=["iq4_nl", "e2m1", "odd"])
def test_the_lookup_is_the_nearest_level_with_ties_to_the_even_index(table, path):
    """The eager lookup (a gather from a table of answers), the traced one and the comparisons called directly."""
    value, magnitude = {"eager": (nearest_value, nearest_magnitude),
                        "traced": (Traced(nearest_value), Traced(nearest_magnitude)),
                        "midpoints": (midpoints(False), midpoints(True))}[path]
    x = table_probes(table)
    assert torch.equal(bits_of(value(x, table)), bits_of(brute_nearest_of(x, table)))
    if table[0] == 0:  # magnitudes: the sign of x, -0.0 for a negative x whose magnitude rounds to 0
        size = brute_nearest_of(x.abs(), table)
        signed = torch.where(x < 0, -size, size)
        assert torch.equal(bits_of(magnitude(x, table)), bits_of(signed))
        assert bits_of(magnitude(torch.tensor([-0.0]), table)).item() == 0  # -0.0 gives +0.0
    if path == "traced":
        assert value.counter.frame_count >= 1  # dynamo traced the lookup (no silent eager fallback)
        assert table[0] != 0 or magnitude.counter.frame_count >= 1


@pytest.mark.parametrize("family,bits,group", [("lsq", 4, 32), ("seq", TERNARY_BITS, 32), ("seq", 2, "channel"),
                                               ("lsq", 3, "tensor"), ("mxfp4", 4, 32), ("binary", 1, 16)])
def test_the_sliced_backward_is_the_whole_matrix_backward(family, bits, group, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    quantizer = get_quantizer(family, bits)
    weight = torch.randn(37, 64, generator=gen) * 0.05
    layout = ScaleLayout(group)
    scale = quantizer.init_scale(layout.scale_view(weight)) * (0.5 + torch.rand(layout.scale_shape(weight.shape), generator=gen))
    spec = WeightQuantSpec(quantizer.grid(), group, quantizer.scale_dtype or torch.float16,
                           quantizer.grad_scale(weight.numel(), scale.numel(), "paretoq"))
    s_r, step = prepare_scales(scale, spec.grid, spec.scale_dtype)
    grad = torch.randn(37, 64, generator=gen)
    whole = fake_quantize_backward(grad, weight, s_r, step, spec.grid, spec.layout, True)
    monkeypatch.setattr(dispatch, "BACKWARD_SLICE", 5 * 64)  # slices of 5 rows, the last of 2
    sliced = TorchEngine().weight_backward(grad, weight, s_r, step, spec, True)
    assert torch.equal(bits_of(sliced[0]), bits_of(whole[0]))
    assert torch.equal(bits_of(sliced[1]), bits_of(whole[1]))


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "iq4_nl", "q4_1"])
def test_the_sliced_ggml_backward_is_the_whole_matrix_backward(name, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    grid = GRIDS[name]
    quantizer = get_quantizer(name, grid.bits)
    matrix = torch.randn(21, 256, generator=gen) * 0.05
    scale = quantizer.init_scale(matrix.reshape(21, -1, grid.block)) * 0.8
    scales = block_scales(scale, grid)
    grad = torch.randn(21, 256, generator=gen)
    whole = ggml_backward_pass(grad, matrix, scales.step, scales.min, grid, True)
    monkeypatch.setattr(dispatch, "BACKWARD_SLICE", 4 * 256)
    sliced = TorchEngine().ggml_backward(grad, matrix, scales.step, scales.min, grid, True)
    assert torch.equal(bits_of(sliced[0]), bits_of(whole[0]))
    assert torch.equal(bits_of(sliced[1]), bits_of(whole[1]))


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "iq4_nl"])
def test_a_table_grid_of_a_transposed_view_is_that_of_its_copy(name):
    """The lookup writes the levels over the codes it is given where they are contiguous: a transposed matrix
    (a non-contiguous view, as an export check may pass) gives its contiguous copy's bits and is left unchanged."""
    gen = torch.Generator().manual_seed(5)
    quantizer = get_quantizer(name, 4)
    group = quantizer.block_size or 32
    stored = torch.randn(64, 40, generator=gen) * 0.05
    matrix = stored.t()
    assert not matrix.is_contiguous()
    scale = quantizer.init_scale(ScaleLayout(group).scale_view(matrix.contiguous())) * 0.7  # some values clip
    spec = WeightQuantSpec(quantizer.grid(), group, quantizer.scale_dtype or torch.float16, 1.0)
    before = stored.clone()
    viewed = quantizer.fake_quantize(matrix, scale, spec)
    assert torch.equal(bits_of(viewed), bits_of(quantizer.fake_quantize(matrix.contiguous(), scale, spec)))
    assert torch.equal(bits_of(stored), bits_of(before))


def test_the_public_lookups_leave_their_input_and_take_a_tensor_that_needs_grad():
    """``nearest_value`` / ``nearest_magnitude`` return new tensors (the in-place ``_`` variants are the engine's),
    also for an input that requires grad (no gradient flows through a lookup), and a family's ``fake_quantize``
    of a Parameter runs with grad enabled."""
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(6)) * 5).requires_grad_(True)
    before = x.detach().clone()
    for value in (nearest_value(x, IQ4_NL_VALUES), nearest_magnitude(x, (0, 1, 2, 3, 4, 6, 8, 12))):
        assert not value.requires_grad and value.shape == x.shape
    assert torch.equal(bits_of(x.detach()), bits_of(before))
    for name in ("mxfp4", "iq4_nl"):
        quantizer = get_quantizer(name, 4)
        weight = torch.nn.Parameter(torch.randn(4, 64, generator=torch.Generator().manual_seed(7)) * 0.05)
        scale = quantizer.init_scale(ScaleLayout(32).scale_view(weight.detach()))
        spec = WeightQuantSpec(quantizer.grid(), 32, quantizer.scale_dtype or torch.float16, 1.0)
        with torch.no_grad():
            expected = quantizer.fake_quantize(weight, scale, spec)
        assert torch.equal(bits_of(quantizer.fake_quantize(weight, scale, spec).detach()), bits_of(expected))


def test_the_e2m1_scale_gradient_factor_element_by_element():
    """MXFP4's backward, one element per group of 32 (the rest 0, whose factor is 0): the factor is the nearest E2M1
    value of ``r`` less ``r`` inside the clip range, +-6 past an end (inf included), NaN for NaN; the weight's
    gradient passes inside and stops outside and at NaN. Restated here from the format, not from the code."""
    quantizer = get_quantizer("mxfp4", 4)
    grid = quantizer.grid()
    specials = [0.2, 0.25, 0.75, 1.25, 2.6, 5.0, 6.0, 6.5, -7.0, 1e30, float("inf"), float("-inf"), float("nan"),
                -0.3, -2.5, -5.1]
    weight = torch.zeros(1, 32 * len(specials))
    weight[0, ::32] = torch.tensor(specials)
    s_r, step = prepare_scales(torch.ones(1, len(specials)), grid, quantizer.scale_dtype)
    grad = torch.ones_like(weight)
    grad_weight, sums = fake_quantize_backward(grad, weight, s_r, step, grid, ScaleLayout(32), True)
    e2m1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

    def nearest(v):  # ties to the even index of the magnitude table
        m = min(range(len(e2m1)), key=lambda i: (abs(e2m1[i] - abs(v)), i % 2))
        return -e2m1[m] if v < 0 else e2m1[m]

    for i, v in enumerate(specials):
        factor, passed = sums[0, i].item(), grad_weight[0, 32 * i].item()
        if v != v:
            assert factor != factor and passed == 0.0
        elif abs(v) > 6.0:
            assert factor == (6.0 if v > 0 else -6.0) and passed == 0.0
        else:
            r = torch.tensor(v, dtype=torch.float32)  # the ratio as the weight holds it (scale 1)
            assert factor == (torch.tensor(nearest(r.item()), dtype=torch.float32) - r).item() and passed == 1.0
