"""Fused MoE experts exported: compressed-tensors under each family's per-expert checkpoint names,
reloaded by plain transformers in a fresh process; the native format in a fresh process with hf_qat."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import hf_qat
from hf_qat import QATConfig
from hf_qat.export import export_checkpoint
from hf_qat.errors import ExportFormatError
from helpers import MOE_CONFIGS, VOCAB, logits_in_fresh_process, tiny_moe

INPUT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(11))


def trained(family, **cfg):
    """A tiny MoE model after two QAT steps (scales moved off their first value)."""
    model = hf_qat.ptq(tiny_moe(family), QATConfig(start=0, **cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(INPUT, labels=INPUT).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def reference(model):
    with torch.no_grad():
        return model(INPUT).logits


def keys(directory):
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family,expert_key", [
    ("qwen3_moe", "model.layers.1.mlp.experts.3.up_proj"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w3"),
    ("qwen2_moe", "model.layers.1.mlp.experts.3.up_proj"),
])
def test_compressed_tensors_experts_reload_without_hf_qat(family, expert_key, tmp_path):
    model = trained(family, bits=4, group_size=16, scale_dtype="float32")
    info = export_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    written = keys(tmp_path / "ct")
    assert {f"{expert_key}.weight_packed", f"{expert_key}.weight_scale", f"{expert_key}.weight_shape"} <= written
    assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in written)  # no dense stack left
    got = logits_in_fresh_process(tmp_path / "ct", "compressed-tensors", INPUT, tmp_path)
    torch.testing.assert_close(got, reference(model), rtol=0, atol=1e-5)
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if p.ndim == 3)
    expert_bytes = info.weight_bytes - (sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
                                            if "experts" not in k and "_quantizer." not in k))
    assert expert_bytes < 0.2 * dense, (expert_bytes, dense)  # 4-bit codes + scales, not fp32 stacks
    assert abs(info.weight_bytes - info.expected_bytes) <= 0.05 * info.expected_bytes


def test_compressed_tensors_refuses_a_family_that_keeps_its_experts_fused(tmp_path):
    model = trained("gpt_oss", bits=4, group_size=16, scale_dtype="float32")
    with pytest.raises(ExportFormatError, match=r"model type 'gpt_oss' keeps these experts fused.*would not load"):
        export_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


NATIVE_SCRIPT = """
import sys, torch, hf_qat
from hf_qat.export import load_exported
model = load_exported(sys.argv[1])
assert type(model.model.layers[0].mlp.experts).__name__.startswith("Packed")
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


@pytest.mark.parametrize("family,cfg", [
    ("gpt_oss", dict(bits=3, group_size=16)),  # transposed stacks, biases, interleaved gate/up
    ("olmoe", dict(bits=2, group_size="tensor")),  # one scale per expert matrix
])
def test_native_format_experts_in_a_fresh_process_and_back_to_training(family, cfg, tmp_path):
    model = trained(family, **cfg)
    info = export_checkpoint(model, tmp_path / "native", format="hf-qat")
    assert abs(info.weight_bytes - info.expected_bytes) <= 0.05 * info.expected_bytes
    torch.save(INPUT, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", NATIVE_SCRIPT, str(tmp_path / "native"), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), reference(model))

    loaded = hf_qat.load_exported(tmp_path / "native")  # re-prepared with its config: QAT continues exactly
    hf_qat.prepare_model_for_qat(loaded, hf_qat.get_qat_config(model))
    assert hf_qat.is_qat_active(loaded)
    assert type(loaded.model.layers[0].mlp.experts).__name__.startswith("QAT")
    with torch.no_grad():
        assert torch.equal(loaded(INPUT).logits, reference(model))


@pytest.mark.parametrize("family,change,reason", [
    ("qwen3_moe", {"norm_topk_prob": False}, "qwen3_moe graph renormalises the top-k routing weights"),
    ("olmoe", {"norm_topk_prob": True}, "olmoe graph does not renormalise"),
    ("olmoe", {}, "as many key heads as query heads"),
    ("qwen3_moe", {"mlp_only_layers": [1], "norm_topk_prob": True}, "has dense layers"),
    ("gpt_oss", {}, "GGUF export writes"),
    ("qwen2_moe", {}, "GGUF export writes"),
])
def test_gguf_refuses_what_llama_cpp_would_route_otherwise(family, change, reason, tmp_path):
    """A setting llama.cpp's MoE graph would not reproduce is named before anything is written
    (tests/export/test_llama_cpp.py runs the ones it does)."""
    from helpers import byte_level_bpe

    widths = {"moe_intermediate_size": 32} if "moe_intermediate_size" in MOE_CONFIGS[family] else {"intermediate_size": 32}
    model = hf_qat.ptq(tiny_moe(family, **widths, **change), QATConfig(bits=4, group_size=32, start=0))
    with pytest.raises(ExportFormatError, match=reason):
        export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=byte_level_bpe("gpt-2", vocab=VOCAB + 256))
    assert not (tmp_path / "gguf").exists()
