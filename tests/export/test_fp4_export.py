"""MXFP4 and NVFP4 exports: compressed-tensors' own formats reloaded by plain transformers in a fresh process,
GGUF blocks read back by gguf-py (and, for MXFP4, transformers' GGUF loader), the native format; each
read independently of hf_qat's packing where a layout is checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hf_qat
from hf_qat import QATConfig
from hf_qat.demo.corpus import train_tokenizer
from hf_qat.export import export_checkpoint, load_exported
from hf_qat.errors import ExportFormatError
from helpers import VOCAB, logits_in_fresh_process, qat_trained_model, tiny_moe

INPUT = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
BLOCK = {"mxfp4": 32, "nvfp4": 16}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n" * 40, "class A:\n    pass\n" * 40], 320)


def logits(model, x=INPUT):
    with torch.no_grad():
        return model(x).logits


def read_e2m1(nibbles: np.ndarray) -> np.ndarray:
    """4-bit E2M1 encodings (bit 3 the sign, bits 0-2 the element) -> their values."""
    return np.where(nibbles & 8, -1.0, 1.0) * np.array(E2M1)[nibbles & 7]


def ct_weight(tensors: dict, prefix: str, family: str) -> np.ndarray:
    """A compressed-tensors FP4 Linear's weight, read from its tensors as the format defines them."""
    packed = tensors[f"{prefix}.weight_packed"].numpy()
    values = np.stack([read_e2m1(packed & 0x0F), read_e2m1(packed >> 4)], axis=-1).reshape(packed.shape[0], -1)
    if family == "mxfp4":
        scale = 2.0 ** (tensors[f"{prefix}.weight_scale"].numpy().astype(np.float64) - 127)
    else:
        scale = tensors[f"{prefix}.weight_scale"].float().double().numpy() / float(tensors[f"{prefix}.weight_global_scale"])
    return values * np.repeat(scale, BLOCK[family], axis=1)


@pytest.mark.parametrize("family", ["mxfp4", "nvfp4"])
def test_compressed_tensors_fp4_reloads_without_hf_qat_bit_for_bit(family, tmp_path):
    model = qat_trained_model(QATConfig(bits=4, method=family, start=0), hidden=64, dtype=torch.bfloat16)
    info = export_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    assert info.exact and info.format == "compressed-tensors"
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == f"{family}-pack-quantized"
    assert (weights["type"], weights["num_bits"], weights["group_size"]) == ("float", 4, BLOCK[family])
    assert weights["strategy"] == ("group" if family == "mxfp4" else "tensor_group")
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    layer = model.model.layers[1].mlp.down_proj
    prefix = "model.layers.1.mlp.down_proj"
    assert tensors[f"{prefix}.weight_packed"].dtype == torch.uint8
    assert tuple(tensors[f"{prefix}.weight_packed"].shape) == (64, 64)
    assert tensors[f"{prefix}.weight_scale"].dtype == (torch.uint8 if family == "mxfp4" else torch.float8_e4m3fn)
    assert (f"{prefix}.weight_global_scale" in tensors) == (family == "nvfp4")
    want = layer.weight_quantizer.quantized(layer.weight).double().numpy()
    assert np.array_equal(ct_weight(tensors, prefix, family), want)
    if family == "nvfp4":  # vLLM fuses q/k/v and gate/up under one global scale: the siblings share it, exactly
        for parent, group in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            names = [f"model.layers.0.{parent}.{leaf}" for leaf in group]
            assert len({float(tensors[f"{n}.weight_global_scale"]) for n in names}) == 1, names
            for name in names:
                sibling = model.get_submodule(name)
                assert np.array_equal(ct_weight(tensors, name, family),
                                      sibling.weight_quantizer.quantized(sibling.weight).double().numpy()), name
    got = logits_in_fresh_process(tmp_path / "ct", "compressed-tensors", INPUT, tmp_path)
    assert torch.equal(got, logits(model))
    assert info.weight_bytes == info.expected_bytes


def test_compressed_tensors_fp4_experts_reload_without_hf_qat_and_nvfp4_experts_are_refused(tmp_path):
    def trained(family):
        model = hf_qat.ptq(tiny_moe("qwen3_moe", moe_intermediate_size=32, dtype=torch.bfloat16),
                           QATConfig(bits=4, method=family, start=0))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(INPUT, labels=INPUT).loss.backward()
        opt.step()
        return model.eval()

    model = trained("mxfp4")
    export_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    expert = "model.layers.1.mlp.experts.3"
    stack = model.model.layers[1].mlp.experts
    quantized = stack.gate_up_proj_quantizer.quantized(stack.gate_up_proj).double().numpy()[3]
    gate, up = quantized[:32], quantized[32:]  # gate first: transformers' concatenated layout
    assert np.array_equal(ct_weight(tensors, f"{expert}.gate_proj", "mxfp4"), gate)
    assert np.array_equal(ct_weight(tensors, f"{expert}.up_proj", "mxfp4"), up)
    got = logits_in_fresh_process(tmp_path / "ct", "compressed-tensors", INPUT, tmp_path)
    assert torch.equal(got, logits(model))
    with pytest.raises(ExportFormatError, match=r"merges compressed-tensors experts without their weight_global_scale"):
        export_checkpoint(trained("nvfp4"), tmp_path / "nv", format="compressed-tensors")


def test_compressed_tensors_refuses_fp4_of_a_float32_model_and_auto_takes_an_exact_format(tmp_path):
    model = qat_trained_model(QATConfig(bits=4, method="nvfp4", start=0), hidden=64)
    with pytest.raises(ExportFormatError, match=r"decompresses nvfp4-pack-quantized weights to bfloat16 whatever the "
                                                 r"model's dtype \(torch.float32 here\).*expected m1 and m2"):
        export_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct" / "config.json").exists()
    auto = export_checkpoint(model, tmp_path / "auto32", format="auto")
    assert auto.format == "hf-qat"  # and it says why compressed-tensors was passed over
    assert any("passed over 'compressed-tensors'" in note and "bfloat16" in note for note in auto.notes), auto.notes
    bf16 = qat_trained_model(QATConfig(bits=4, method="mxfp4", start=0), hidden=64, dtype=torch.bfloat16)
    assert export_checkpoint(bf16, tmp_path / "auto16", format="auto").format == "compressed-tensors"


@pytest.mark.parametrize("family", ["mxfp4", "nvfp4"])
def test_native_fp4_with_a_tied_embedding_and_experts_reloads_and_resumes_exactly(family, tmp_path):
    cfg = QATConfig(bits=4, method=family, start=0, embedding_bits=4, embedding_method=family)
    model = qat_trained_model(cfg, tie=True, hidden=64)
    info = export_checkpoint(model, tmp_path / "native", format="hf-qat")
    assert torch.equal(logits(load_exported(tmp_path / "native")), logits(model))
    assert info.weight_bytes == info.expected_bytes
    resumed = hf_qat.prepare_model_for_qat(load_exported(tmp_path / "native"), cfg)  # scales back from the steps
    assert torch.equal(logits(resumed), logits(model))
    moe = hf_qat.ptq(tiny_moe("qwen3_moe", moe_intermediate_size=32), QATConfig(bits=4, method=family, start=0))
    export_checkpoint(moe, tmp_path / "moe", format="hf-qat")
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(load_exported(tmp_path / "moe"), x), logits(moe, x))


def gguf_fp4_blocks(raw: np.ndarray, qtype: str) -> np.ndarray:
    """ggml's block_mxfp4 / block_nvfp4 read independently: the weights of each block (NVFP4: before the
    per-tensor scale). kvalues are doubled E2M1 values dequantized with half the block scale."""
    kvalues = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float64)
    if qtype == "MXFP4":
        blocks = raw.reshape(-1, 17)
        d = 2.0 ** (blocks[:, :1].astype(np.float64) - 128)  # E8M0 / 2
        qs = blocks[:, 1:]
        return np.concatenate([kvalues[qs & 0x0F], kvalues[qs >> 4]], axis=1) * d
    blocks = raw.reshape(-1, 36)
    e4m3 = torch.from_numpy(blocks[:, :4].copy()).view(torch.float8_e4m3fn).double().numpy()[:, :, None] / 2
    qs = blocks[:, 4:].reshape(-1, 4, 8)
    return (np.concatenate([kvalues[qs & 0x0F], kvalues[qs >> 4]], axis=2) * e4m3).reshape(-1, 64)


@pytest.mark.parametrize("family,qtype", [("mxfp4", "MXFP4"), ("nvfp4", "NVFP4")])
def test_gguf_fp4_blocks_read_back_exactly(family, qtype, tokenizer, tmp_path):
    import gguf

    extra = dict(embedding_bits=4, embedding_method="mxfp4") if family == "mxfp4" else {}
    model = qat_trained_model(QATConfig(bits=4, method=family, start=0, **extra), hidden=64, tie=True, vocab=320)
    info = export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer)
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf")).tensors}
    for name, layer in (("blk.1.ffn_down", model.model.layers[1].mlp.down_proj),
                        ("blk.0.attn_output", model.model.layers[0].self_attn.o_proj)):
        t = tensors[f"{name}.weight"]
        assert t.tensor_type.name == qtype
        want = layer.weight_quantizer.quantized(layer.weight).double().numpy()
        tensor_scale = float(np.asarray(tensors[f"{name}.scale"].data)[0]) if qtype == "NVFP4" else 1.0
        assert (f"{name}.scale" in tensors) == (qtype == "NVFP4")
        assert np.array_equal(gguf_fp4_blocks(np.asarray(t.data).reshape(-1), qtype).reshape(want.shape) * tensor_scale, want)
        dequantized = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        assert np.array_equal(dequantized.astype(np.float64) * tensor_scale, want)  # gguf-py's own dequantizer
    assert info.weight_bytes == info.expected_bytes
    assert bool(info.notes) == (family == "nvfp4")  # transformers' GGUF loader cannot read <name>.scale
    if family == "mxfp4":  # the tied MXFP4 embedding is token_embd (llama.cpp reads the output from it)
        assert tensors["token_embd.weight"].tensor_type.name == "MXFP4" and "output.weight" not in tensors
        got = logits_in_fresh_process(tmp_path / "gguf", "gguf", INPUT, tmp_path)
        torch.testing.assert_close(got, logits(model), rtol=0, atol=1e-5)


def test_gguf_nvfp4_refusals_name_llama_cpp_reasons(tokenizer, tmp_path):
    tied = qat_trained_model(QATConfig(bits=4, method="nvfp4", start=0, embedding_bits=4, embedding_method="nvfp4"),
                             hidden=64, tie=True, vocab=320)
    with pytest.raises(ExportFormatError, match=r"per-tensor scale \(<name>.scale\) into matmul outputs only: the "
                                                 r"token embedding has none"):
        export_checkpoint(tied, tmp_path / "tied", format="gguf", tokenizer=tokenizer)
    narrow = qat_trained_model(QATConfig(bits=4, method="nvfp4", start=0), hidden=32, vocab=320)
    with pytest.raises(ExportFormatError, match=r"NVFP4 blocks hold 64 weights .*this input width is 32"):
        export_checkpoint(narrow, tmp_path / "narrow", format="gguf", tokenizer=tokenizer)
    assert not (tmp_path / "tied").exists() and not (tmp_path / "narrow").exists()


def test_gguf_nvfp4_is_refused_where_llama_cpp_ignores_the_per_tensor_scale(tokenizer, tmp_path):
    """qwen2's graph (like gemma2/3's dense FFN and olmoe's experts) never multiplies <name>.scale in: its
    logits came out NaN. Refused before anything is written; MXFP4 has no per-tensor scale and is written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def qwen2(method):
        config = AutoConfig.for_model("qwen2", vocab_size=320, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True)
        return hf_qat.ptq(AutoModelForCausalLM.from_config(config), QATConfig(bits=4, method=method, start=0))

    with pytest.raises(ExportFormatError, match="qwen2 graph does not multiply in the per-tensor scale of NVFP4"):
        export_checkpoint(qwen2("nvfp4"), tmp_path / "nvfp4", format="gguf", tokenizer=tokenizer)
    assert not (tmp_path / "nvfp4").exists()
    export_checkpoint(qwen2("mxfp4"), tmp_path / "mxfp4", format="gguf", tokenizer=tokenizer)
    assert (tmp_path / "mxfp4" / "model.gguf").is_file()
