"""register_quantizer: the documented extension point for new quantizer families."""

from __future__ import annotations

import pytest
import torch

import hf_qat
from hf_qat import QATConfig, QATConfigError
from hf_qat.quantizers import Quantizer, available_quantizers, get_quantizer, lsq_grid, register_quantizer
from helpers import tiny_llama


@register_quantizer("test_lsq_meaninit")
class MeanInitLSQ(Quantizer):
    """LSQ's grid with LSQ's original first step 2 * mean|w| / sqrt(Qp)."""

    supported_bits = (4, 8)

    def grid(self):
        return lsq_grid(int(self.bits))

    def init_scale(self, groups):
        return 2 * groups.abs().mean(-1) / self.grid().qp_int ** 0.5


def test_a_registered_family_trains_end_to_end():
    assert "test_lsq_meaninit" in available_quantizers()
    cfg = QATConfig(bits=4, group_size=16, method="test_lsq_meaninit", start=0)
    model = hf_qat.prepare_model_for_qat(tiny_llama(), cfg)
    hf_qat.activate_qat(model)
    layer = model.model.layers[0].mlp.down_proj
    expected = 2 * layer.weight.detach().view(32, 4, 16).abs().mean(-1) / 7 ** 0.5
    torch.testing.assert_close(layer.weight_quantizer.scale(layer.weight).detach(), expected)
    x = torch.randint(0, 64, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    assert layer.weight_quantizer.log_scale_ratio.grad is not None
    codes, _ = layer.weight_quantizer.codes(layer.weight)
    assert set(codes.unique().tolist()) <= set(range(-8, 8))


def test_the_registered_family_checks_its_bits():
    with pytest.raises(QATConfigError, match=r"bits=2 .*4, 8 with method='test_lsq_meaninit'"):
        QATConfig(bits=2, method="test_lsq_meaninit")
    assert get_quantizer("test_lsq_meaninit", 8).grid().codes == list(range(-128, 128))


def test_registration_errors():
    with pytest.raises(ValueError, match="already registered"):
        @register_quantizer("lsq")
        class Other(Quantizer):
            supported_bits = (4,)
    with pytest.raises(TypeError, match="Quantizer subclass"):
        register_quantizer("not_a_class")(object)
    with pytest.raises(ValueError, match="other than 'auto'"):
        register_quantizer("auto")
    with pytest.raises(ValueError, match="supported_bits"):
        @register_quantizer("test_no_bits")
        class NoBits(Quantizer):
            pass
