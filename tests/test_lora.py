"""PEFT LoRA with QAT: the merged weight is quantized, so merge_and_unload and export are exact."""

from __future__ import annotations

import pytest
import torch

import hf_qat
from hf_qat import QATCallback, QATConfig, QATModelError
from hf_qat.export import export_checkpoint, load_exported
from helpers import make_trainer, tiny_llama, token_dataset

peft = pytest.importorskip("peft")
INPUT = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


def lora_model(dropout: float = 0.0):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=dropout)
    return peft.get_peft_model(tiny_llama(), config)


def train_steps(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    data = token_dataset(n=steps * 4)
    for step in range(steps):
        batch = torch.stack([r["input_ids"] for r in data[step * 4:(step + 1) * 4]])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()


def test_merged_mode_merge_and_export_reproduce_the_model_with_adapters(tmp_path):
    model = lora_model()
    hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0, lora_mode="merged"))
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, hf_qat.QATLinear) and base.weight_quantizer.log_scale_ratio.requires_grad
    hf_qat.activate_qat(model)
    train_steps(model)
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().sum() > 0 and base.weight_quantizer.log_scale_ratio.grad is None  # trained; zero_grad ran
    with torch.no_grad():
        with_adapters = model(INPUT).logits
    with pytest.raises(QATModelError, match="merge_and_unload"):
        export_checkpoint(model, tmp_path / "unmerged", format="hf-qat")
    merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, hf_qat.QATLinear)
    with torch.no_grad():
        assert torch.equal(merged(INPUT).logits, with_adapters)
    export_checkpoint(merged, tmp_path / "export", format="hf-qat")
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "export")(INPUT).logits, with_adapters)


def test_merged_mode_quantizes_w_plus_delta():
    model = lora_model()
    hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0))
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    hf_qat.activate_qat(model)
    x = torch.randn(3, 32)
    base = layer.base_layer
    merged = base.weight + layer.get_delta_weight("default")
    expected = torch.nn.functional.linear(
        x, base.weight_quantizer.quantized(merged))
    assert torch.equal(layer(x), expected)


def test_base_mode_keeps_full_precision_adapters_on_a_quantized_base():
    model = lora_model()
    hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0, lora_mode="base"))
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    hf_qat.activate_qat(model)
    x = torch.randn(3, 32)
    expected = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    torch.testing.assert_close(layer(x), expected)


def test_merged_mode_refuses_lora_dropout():
    with pytest.raises(QATModelError, match="lora_dropout=0"):
        hf_qat.prepare_model_for_qat(lora_model(dropout=0.1), QATConfig(bits=4, group_size=16, start=0))


def test_trainer_with_lora_and_qat_callback(tmp_path):
    model = lora_model()
    callback = QATCallback(bits=4, group_size=16, start=4)
    trainer = make_trainer(tmp_path, [callback], model=model, max_steps=8)
    trainer.train()
    groups = trainer.optimizer.param_groups
    scale_group = next(g for g in groups if g.get("hf_qat_scales"))
    assert scale_group["params"] and all(p.requires_grad for p in scale_group["params"])
    lora_params = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora_params
    assert hf_qat.is_qat_active(model)
    with torch.no_grad():
        before = model(INPUT).logits
        merged = model.merge_and_unload()
        assert torch.equal(merged(INPUT).logits, before)


def saved_base_lora(tmp_path):
    """A LoRA model on a base saved to disk (a PEFT checkpoint names its base by path)."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    return peft.get_peft_model(base, config)


def test_lora_checkpoints_keep_the_scales_resume_exactly_and_export(tmp_path):
    """A PEFT checkpoint holds only the adapter: hf_qat saves the QAT state beside it, loads it on resume
    (the run continues bit for bit after the switch) and export_checkpoint rebuilds base + adapter + QAT."""
    cfg = QATConfig(bits=4, group_size=16, start=4)
    full = make_trainer(tmp_path / "run", [QATCallback(cfg)], model=saved_base_lora(tmp_path), max_steps=10,
                        save_strategy="steps", save_steps=6)
    full.train()
    with torch.no_grad():
        expected = full.model(INPUT).logits
    checkpoint = tmp_path / "run" / "checkpoint-6"
    assert (checkpoint / "hf_qat_state.safetensors").is_file() and (checkpoint / "adapter_model.safetensors").is_file()

    resumed = make_trainer(tmp_path / "run", [QATCallback(cfg)], model=saved_base_lora(tmp_path), max_steps=10)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    with torch.no_grad():
        assert torch.equal(resumed.model(INPUT).logits, expected)

    hf_qat.export_checkpoint(str(tmp_path / "run" / "checkpoint-10"), tmp_path / "export", format="hf-qat")
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "export")(INPUT).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["merged", "base"])
def test_remove_qat_on_a_lora_model_keeps_its_function(mode):
    model = lora_model()
    hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0, lora_mode=mode))
    hf_qat.activate_qat(model)
    train_steps(model)
    with torch.no_grad():
        qat = model(INPUT).logits
    hf_qat.remove_qat(model, bake_weights=True)
    assert not any(isinstance(m, hf_qat.QATLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT).logits, qat, rtol=0, atol=1e-5)  # the delta counted once
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(INPUT).logits, qat, rtol=0, atol=1e-5)


def test_remove_qat_without_baking_leaves_plain_lora():
    model = lora_model()
    hf_qat.prepare_model_for_qat(model, QATConfig(bits=4, group_size=16, start=0))
    hf_qat.activate_qat(model)
    train_steps(model)
    hf_qat.remove_qat(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    expected = torch.nn.functional.linear(x, layer.base_layer.weight) + layer.lora_B["default"](
        layer.lora_A["default"](x)) * layer.scaling["default"]
    torch.testing.assert_close(layer(x), expected)


def test_lora_switch_teacher_resumes_after_the_switch_and_the_output_dir_gets_the_qat_state(tmp_path):
    """With PEFT the 'switch' teacher is the base model itself: nothing to save, nothing to miss on resume.
    The run's output dir (where save_model writes the adapter) also gets the final QAT state."""
    cfg = QATConfig(bits=4, group_size=16, start=4, distill={"teacher": "switch", "weight": 0.5})
    full = make_trainer(tmp_path / "run", [QATCallback(cfg)], model=saved_base_lora(tmp_path), max_steps=8,
                        save_strategy="steps", save_steps=6)
    full.train()
    with torch.no_grad():
        expected = full.model(INPUT).logits
    resumed = make_trainer(tmp_path / "run", [QATCallback(cfg)], model=saved_base_lora(tmp_path), max_steps=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    with torch.no_grad():
        assert torch.equal(resumed.model(INPUT).logits, expected)
    full.save_model()
    hf_qat.export_checkpoint(str(tmp_path / "run"), tmp_path / "export", format="hf-qat")
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "export")(INPUT).logits, expected, rtol=0, atol=1e-5)
