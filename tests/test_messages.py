"""What a new user reads when something is off: each message says what is wrong and what to type instead."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import hf_qat
from hf_qat import QATCallback, QATConfig, QATConfigError, QATModelError
from hf_qat.cli import main
from hf_qat.export import export_checkpoint
from hf_qat.counts import human
from helpers import byte_level_bpe, make_trainer, tiny_llama


def test_gpt2_conv1d_layers_are_named_not_reported_as_lm_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(QATModelError) as err:
        hf_qat.prepare_model_for_qat(model, QATConfig(start=0))
    message = str(err.value)
    assert "Conv1D" in message and "c_attn" in message and "c_fc" in message
    assert "quantizable weights end in: lm_head" not in message


def test_a_typo_in_a_field_names_the_nearest_field():
    with pytest.raises(QATConfigError, match=r"QATConfig.group_sise=32 .*did you mean 'group_size'\?"):
        QATConfig(group_sise=32)
    with pytest.raises(QATConfigError, match=r"did you mean 'scale_init'\?"):
        QATConfig.from_dict({"scale_int": "mse"})
    with pytest.raises(QATConfigError, match=r"did you mean"):
        QATConfig().replace(bitz=4)


def test_presets_in_any_case_and_the_nearest_one_suggested():
    assert QATConfig.from_preset("Q4_K_M").to_dict() == QATConfig.from_preset("q4_k_m").to_dict()
    assert QATConfig.from_preset("W4G32", start=3).start == 3
    with pytest.raises(QATConfigError, match=r"preset='q4km' .*did you mean 'q4_k_m'\?"):
        QATConfig.from_preset("q4km")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Trainer checkpoint of a 4-bit g32 QAT run (Q4_0 in GGUF), saved without a tokenizer."""
    out = tmp_path_factory.mktemp("run")
    cfg = QATConfig(bits=4, group_size=32, start=2, manage_schedule=False)
    make_trainer(out, [QATCallback(cfg)], max_steps=4, save_strategy="steps", save_steps=4).train()
    return out / "checkpoint-4"


def test_cli_export_to_gguf_without_a_tokenizer_names_the_flag(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), str(tmp_path / "out"), "--format", "gguf"]) == 2
    out = capsys.readouterr().out
    assert "--tokenizer" in out and "export_checkpoint(" not in out


def test_cli_export_prints_no_load_report_of_the_qat_keys(checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hf_qat.cli", "export", str(checkpoint), str(tmp_path / "out"),
                           "--format", "hf-qat"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported hf-qat" in proc.stdout
    assert "LOAD REPORT" not in proc.stdout + proc.stderr and "UNEXPECTED" not in proc.stdout + proc.stderr


def test_memory_sizes_print_as_bytes(capsys, tmp_path):
    from hf_qat.planner.law import ILLUSTRATIVE_PARAMS, QATScalingLaw

    assert human(1e9, "B") == "1GB" and human(2.5e6, "B") == "2.5MB" and human(2.6e9) == "2.6B"
    law = QATScalingLaw(dict(ILLUSTRATIVE_PARAMS)).save(tmp_path / "law.json")
    assert main(["best-bits", "--memory", "1GB", "--tokens", "100B", "--law", law]) == 0
    out = capsys.readouterr().out
    assert "1GB of weights" in out and "1BB" not in out


def test_a_bf16_gguf_export_counts_its_f32_tensors_and_says_why(tmp_path):
    model = tiny_llama(vocab=320, dtype=torch.bfloat16)
    hf_qat.ptq(model, QATConfig.from_preset("w8g32"))
    info = export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=byte_level_bpe("gpt-2"))
    assert info.weight_bytes <= info.expected_bytes  # the F32 norms and embedding are expected, not a surprise
    assert any("written F32" in note and "bfloat16" in note for note in info.notes), info.notes
