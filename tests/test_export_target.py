"""QATConfig(export_format=...): the export target is checked when the QAT layers are installed, before the
first step, and the default scales follow what the target and the model's dtype need."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_qat
from hf_qat import QATCallback, QATConfig, QATConfigError
from hf_qat.export import ExportFormatError, export_checkpoint
from helpers import make_trainer, tiny_llama


def test_the_default_scales_follow_the_target():
    assert QATConfig().scale_dtype == "float16"
    assert QATConfig(export_format="gguf").scale_dtype == "float16"
    ct = QATConfig(export_format="compressed-tensors")
    assert ct.scale_dtype == "auto" and QATConfig.from_dict(ct.to_dict()).to_dict() == ct.to_dict()
    assert QATConfig(export_format="compressed-tensors", scale_dtype="float32").scale_dtype == "float32"
    assert QATConfig(method="mxfp4", export_format="compressed-tensors").scale_dtype == "float16"  # its own E8M0
    assert ct.resolved_scale_dtype(torch.bfloat16) == "bfloat16" and ct.resolved_scale_dtype(torch.float32) == "float16"


def test_an_unknown_target_names_the_formats_and_the_nearest():
    with pytest.raises(QATConfigError, match=r"export_format='ggfu' .*compressed-tensors, .*gguf.*did you mean 'gguf'"):
        QATConfig(export_format="ggfu")


def test_a_bf16_model_trains_and_exports_to_compressed_tensors_with_the_defaults(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    cfg = QATConfig(bits=4, group_size=16, start=2, manage_schedule=False, export_format="compressed-tensors")
    trainer = make_trainer(tmp_path / "run", [QATCallback(cfg)], model=model, max_steps=4, bf16=True)
    trainer.train()
    units = [w.weight_quantizer for _, w in hf_qat.model.convert.quantizer_units(trainer.model)]
    assert units and all(u.spec.scale_dtype == torch.bfloat16 for u in units)
    info = export_checkpoint(trainer.model, tmp_path / "ct", format="compressed-tensors")
    assert info.format == "compressed-tensors" and info.exact


def test_fp16_scales_on_a_bf16_model_are_refused_before_the_first_step_in_one_line(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    cfg = QATConfig(bits=4, group_size=16, start=2, export_format="compressed-tensors", scale_dtype="float16")
    with pytest.raises(ExportFormatError) as err:
        make_trainer(tmp_path / "run", [QATCallback(cfg)], model=model, max_steps=4)  # the constructor refuses
    message = str(err.value)
    assert message.startswith("QATConfig.export_format='compressed-tensors': format 'compressed-tensors' cannot")
    assert message.count("not representable in the weight dtype torch.bfloat16") == 1
    assert "and 13 more layers" in message and "scale_dtype='auto'" in message


def test_a_gguf_target_checks_the_blocks_and_the_architecture_at_install():
    with pytest.raises(ExportFormatError, match=r"QATConfig.export_format='gguf': .*and 13 more layers"):
        hf_qat.prepare_model_for_qat(tiny_llama(), QATConfig(bits=4, group_size=16, export_format="gguf"))
    hf_qat.prepare_model_for_qat(tiny_llama(), QATConfig(bits=4, group_size=32, export_format="gguf"))  # Q4_0
    config = AutoConfig.for_model("phi", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4)
    with pytest.raises(ExportFormatError, match=r"QATConfig.export_format='gguf': GGUF export writes .*this model is 'phi'"):
        hf_qat.prepare_model_for_qat(AutoModelForCausalLM.from_config(config),
                                     QATConfig(bits=4, group_size=32, export_format="gguf"))


def test_a_llama_cpp_mix_checks_its_blocks_against_the_target():
    hf_qat.prepare_model_for_qat(tiny_llama(hidden=256), QATConfig.from_preset("q4_k_m", export_format="gguf"))
    with pytest.raises(hf_qat.QATConfigError, match=r"QATConfig.export_format='compressed-tensors' .*None or 'gguf' "
                                                    r"for gguf_mix='q4_k_m'"):  # refused when the config is built
        QATConfig.from_preset("q4_k_m", export_format="compressed-tensors")
