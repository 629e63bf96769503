"""A native checkpoint loaded with transformers can be trained on with the Trainer (QAT continues)."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

import hf_qat
from hf_qat import QATCallback, QATConfig
from hf_qat.export import PackedLinear, export_checkpoint, load_exported
from helpers import make_trainer, qat_trained_model

INPUT = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


def test_native_checkpoint_continues_qat_under_the_trainer(tmp_path):
    cfg = QATConfig(bits=4, group_size=16, start=0, embedding_bits=4, manage_schedule=False)
    export_checkpoint(qat_trained_model(cfg), tmp_path / "native", format="hf-qat")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    assert isinstance(model.model.layers[0].mlp.up_proj, PackedLinear) and model.is_quantized
    with torch.no_grad():
        packed_logits = model(INPUT).logits
    saved = QATConfig.from_dict(model.config.quantization_config.qat_config)
    assert saved == cfg

    trainer = make_trainer(tmp_path / "run", [QATCallback(saved)], model=model, max_steps=3)
    # Re-prepared with its own config, the model is a QAT model that computes exactly what the packed one did.
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, hf_qat.QATLinear) and layer.is_qat_active and not model.is_quantized
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(INPUT).logits, packed_logits)
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    with torch.no_grad():
        trained = model.eval()(INPUT).logits
    assert not torch.equal(trained, packed_logits)
    export_checkpoint(model, tmp_path / "again", format="hf-qat")
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "again")(INPUT).logits, trained)
