"""The importance matrix (hf_qat.model.importance): per input column, the mean squared activation the FP model feeds a
layer; the mse scale search weighted by it, as llama.cpp's imatrix weights its quantizers' errors."""

from __future__ import annotations

import pytest
import torch

import hf_qat
from hf_qat import QATConfig
from hf_qat.model.convert import quantized_weights
from hf_qat.quantizers import get_quantizer
from hf_qat.quantizers.kquants import GRIDS, ggml_fake_quantize, ggml_mse_scale
from hf_qat.quantizers.reference import WeightQuantSpec, fake_quantize_weight, mse_scale
from hf_qat.quantizers.base import ScaleLayout
from helpers import tiny_llama, token_dataset


def test_calibration_records_each_columns_mean_squared_input():
    model = hf_qat.prepare_model_for_qat(tiny_llama(), QATConfig(bits=4, group_size=16, scale_init="mse"))
    batches = [torch.stack([row["input_ids"] for row in token_dataset(n=8)[i:i + 4]]) for i in (0, 4)]
    seen = {}
    layer = model.model.layers[1].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda m, args: seen.setdefault(len(seen), args[0].detach()))
    assert hf_qat.calibrate_importance(model, batches) == 14  # 7 Linear layers x 2 blocks
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen.values()])
    assert torch.allclose(layer.weight_quantizer.importance, x.pow(2).mean(0), rtol=1e-5)
    assert not hf_qat.is_qat_active(model)  # calibration leaves QAT dormant: the FP model's statistics


def _weighted_error(w, q, importance):
    return float(((q - w).pow(2) * importance).sum())


def test_the_weighted_search_lowers_the_weighted_error_and_changes_the_choice():
    """Columns of very unequal importance: the weighted search never does worse on the weighted error than
    the plain one (it minimises it over the same candidates), and does strictly better here."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.linspace(0.2, 3.0, 256)
    importance = torch.rand(256, generator=g) ** 4 * 100
    quantizer = get_quantizer("lsq", 3)
    layout = ScaleLayout(32)
    spec = WeightQuantSpec(grid=quantizer.grid(), group_size=32, scale_dtype=torch.float16, grad_scale=1.0)
    first = quantizer.init_scale(layout.scale_view(w))
    plain, weighted = mse_scale(w, first, spec), mse_scale(w, first, spec, importance=importance)
    errors = [_weighted_error(w, fake_quantize_weight(w, s, spec), importance) for s in (plain, weighted)]
    assert errors[1] < errors[0]
    grid = GRIDS["q4_k"]
    first = get_quantizer("q4_k", 4).init_scale(w.reshape(64, -1, grid.block))
    plain, weighted = ggml_mse_scale(w, first, grid), ggml_mse_scale(w, first, grid, importance=importance)
    errors = [_weighted_error(w, ggml_fake_quantize(w, s, grid), importance) for s in (plain, weighted)]
    assert errors[1] <= errors[0] and not torch.equal(plain, weighted)


def test_ptq_with_calibration_uses_the_importance():
    batches = [torch.stack([row["input_ids"] for row in token_dataset(n=4)])]
    cfg = QATConfig(bits=3, group_size=16, scale_init="mse")
    plain = hf_qat.ptq(tiny_llama(), cfg)
    calibrated = hf_qat.ptq(tiny_llama(), cfg, calibration=batches)
    scales = [{n: qw.weight_quantizer.init_scale.clone() for n, qw in quantized_weights(m)} for m in (plain, calibrated)]
    assert any(not torch.equal(scales[0][n], scales[1][n]) for n in scales[0])
    assert all(qw.weight_quantizer.importance is not None for _, qw in quantized_weights(calibrated))


def test_calibration_without_the_mse_search_is_refused():
    batches = [torch.stack([row["input_ids"] for row in token_dataset(n=4)])]
    with pytest.raises(hf_qat.QATConfigError, match=r"scale_init='max'.*'mse' with ptq"):
        hf_qat.ptq(tiny_llama(), QATConfig(bits=4, group_size=16), calibration=batches)


def test_a_trainer_run_starts_qat_from_the_calibrated_search(tmp_path):
    """calibrate_importance on trainer.model before train(): the switch initialises the scales with it."""
    from hf_qat import QATCallback
    from helpers import make_trainer

    cfg = QATConfig(bits=3, group_size=16, scale_init="mse", start=2)
    batches = [torch.stack([row["input_ids"] for row in token_dataset(n=4)])]
    runs = {}
    for calibrated in (False, True):
        trainer = make_trainer(tmp_path / str(calibrated), [QATCallback(cfg)], max_steps=3)
        if calibrated:
            assert hf_qat.calibrate_importance(trainer.model, batches) == 14
        trainer.train()
        runs[calibrated] = {n: qw.weight_quantizer.init_scale.clone() for n, qw in quantized_weights(trainer.model)}
    assert any(not torch.equal(runs[False][n], runs[True][n]) for n in runs[False])
