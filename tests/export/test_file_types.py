"""Every llama.cpp file type hf_qat trains, end to end, on the models users quantize: a Llama whose widths are
multiples of 256 (untied), one as wide as SmolLM2 (576: no row of the attention or the embedding fills a 256
block, so every k-quant falls back there), tied and untied, and a Qwen3-MoE with fused expert stacks.

For each file type and model, ``QATConfig.from_preset(file_type)`` -> the GGUF export, held against llama.cpp's
own quantizer (``llama_model_quantize``) run at that file type on the F32 GGUF of the same model:

- every tensor has llama.cpp's type, and the files' sizes agree within 1 % (the MoE: every tensor has the type
  of hf_qat's port of llama.cpp's rule, which test_gguf_mix holds against llama.cpp's quantizer on MoE files:
  hf_qat's F32 writer, the quantizer's input here, writes dense models only);
- gguf-py's dequantizer (ggml's own for Q1_0, which gguf-py cannot read) gives back every baked QAT weight,
  bit for bit (the file holds what QAT trained);
- llama.cpp loads the file and computes the QAT model's logits: the mean difference under 5 % of the logits'
  spread, the same argmax at 75 % of the positions (loose: llama.cpp also rounds the activations, which grows
  with depth and flips an expert here and there; test_llama_cpp measures that tightly, one model per family);
- where llama.cpp's quantizer stops on a model (Q1_0, whose blocks of 128 have no fallback type, on SmolLM2's
  576-wide rows), the preset refuses it too, before anything is trained.

(test_kquant_export holds the 256-wide tied and 320-wide untied Llamas against the same quantizer.)
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import hf_qat
from hf_qat import QATConfig
from hf_qat.errors import QATConfigError
from hf_qat.export import export_checkpoint, export_float_gguf
from hf_qat.llamacpp.file_types import MIXES, MixModel, mix_tensor_types
from hf_qat.model.weights import qat_modules
from helpers import byte_level_bpe, tiny_causal_lm
from llama_runtime import ggml_library, load, quantize

TEXT = "def f(x):\n    return x + 1  # 12345\nclass A:\n    pass\n"
SMOLLM2 = dict(sharpen=1.0, hidden_size=576, intermediate_size=256, num_attention_heads=9, num_key_value_heads=3)
MODELS = {  # name -> (build, tokenizer's pre-tokenizer): 2 layers (test_kquant_export has the 8-layer rules)
    "llama-256-untied": (lambda: tiny_causal_lm("llama", sharpen=1.0, hidden_size=256, intermediate_size=256,
                                                num_attention_heads=8, num_key_value_heads=2,
                                                tie_word_embeddings=False), "gpt-2"),
    "llama-576-tied": (lambda: tiny_causal_lm("llama", tie_word_embeddings=True, **SMOLLM2), "gpt-2"),
    "llama-576-untied": (lambda: tiny_causal_lm("llama", tie_word_embeddings=False, **SMOLLM2), "gpt-2"),
    "qwen3moe": (lambda: tiny_causal_lm("qwen3_moe", sharpen=1.0, hidden_size=256, intermediate_size=256, num_experts=4,
                                        num_experts_per_tok=2, moe_intermediate_size=256, head_dim=64,
                                        num_hidden_layers=2, norm_topk_prob=True, tie_word_embeddings=False), "qwen2"),
}


def dequantize(tensor) -> np.ndarray:
    """gguf-py's dequantizer, or ggml's own ``dequantize_row_<type>`` for a type gguf-py cannot read (Q1_0)."""
    try:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        row = f"dequantize_row_{tensor.tensor_type.name.lower()}"
        raw = np.ascontiguousarray(tensor.data).reshape(-1)
        out = np.zeros(int(np.prod([int(d) for d in tensor.shape])), dtype=np.float32)
        getattr(ggml_library(row), row)(raw.ctypes.data, out.ctypes.data, out.size)
        return out


def gguf_tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def baked_weights(model) -> dict[str, np.ndarray]:
    """GGUF tensor name -> the weight the QAT model computes with, in the GGUF's row order (llama.cpp's
    converter interleaves Llama's q/k rows for its rotary pairs; expert stacks split into gate and up)."""
    cfg = model.config
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE}[cfg.model_type]
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    out = {}
    for name, module in qat_modules(model):
        for attr, unit in module.weight_quantizers().items() if hasattr(module, "weight_quantizers") else [
                ("weight", module.weight_quantizer)]:
            baked = unit.quantized(getattr(module, attr).detach()).float().numpy()
            if attr == "gate_up_proj":  # [E, 2I, H]: gate rows first
                half = baked.shape[1] // 2
                pieces = {"gate_proj": baked[:, :half], "up_proj": baked[:, half:]}
            else:
                pieces = {attr: baked}
            for piece, value in pieces.items():
                full = f"{name}.{piece}" if piece != "weight" else name
                if cfg.model_type == "llama" and name.endswith(("q_proj", "k_proj")):
                    heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
                    value = value.reshape(heads, 2, -1, value.shape[1]).swapaxes(1, 2).reshape(value.shape)
                gguf_name = names.get_name(f"{full}.weight", try_suffixes=(".weight",)) or names.get_name(
                    full, try_suffixes=(".weight",))
                assert gguf_name is not None, full
                if gguf_name.startswith("output") and cfg.tie_word_embeddings:  # a tied head is written as the embedding
                    gguf_name = "token_embd"
                out[gguf_name if gguf_name.endswith(".weight") else gguf_name + ".weight"] = value
    return out


@pytest.mark.parametrize("model_key", sorted(MODELS))
@pytest.mark.parametrize("file_type", MIXES)
def test_the_export_is_llama_cpps_file_and_holds_the_qat_weights(file_type, model_key, tmp_path):
    build, pre = MODELS[model_key]
    tokenizer = byte_level_bpe(pre)
    try:
        model = hf_qat.ptq(build(), QATConfig.from_preset(file_type)).eval()
    except QATConfigError as refused:  # only where llama.cpp's own quantizer stops on the model too
        assert "to fall back to" in str(refused), refused
        f32 = export_float_gguf(build(), str(tmp_path / "f32"), tokenizer)
        assert quantize(f32, tmp_path / "llama-quantize.gguf", f"LLAMA_FTYPE_MOSTLY_{file_type.upper()}", nthread=2) != 0
        return
    export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer)
    ours_path = tmp_path / "gguf" / "model.gguf"
    ours = gguf_tensors(ours_path)

    baked = baked_weights(model)
    for name, want in baked.items():
        tensor = ours[name]
        assert tuple(int(d) for d in reversed(tensor.shape)) == want.shape, (name, tensor.shape)  # ggml lists ne0 first
        got = dequantize(tensor).reshape(want.shape)
        assert np.array_equal(got, want), (name, tensor.tensor_type.name)
    assert {ours[name].tensor_type.name for name in baked} - {"F32", "F16"}, "nothing quantized"
    quantized = {n for n, t in ours.items() if t.tensor_type.name not in ("F32", "F16")}
    assert quantized <= baked.keys(), sorted(quantized - baked.keys())  # no quantized tensor QAT did not train

    ids = tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    with load(ours_path, n_ctx=128) as llm:
        assert llm.tokenize(TEXT) == ids
        got = llm.eval(ids).astype(np.float64)
    spread = want.std()  # a file that computes something else misses by about the spread itself
    assert np.abs(got - want).mean() < 0.05 * spread, (np.abs(got - want).mean(), spread)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75

    types = {n: t.tensor_type.name for n, t in ours.items()}
    if model.config.model_type == "qwen3_moe":
        # export_float_gguf writes dense models only: the MoE file's types are held against the rule, which
        # test_gguf_mix holds against llama_model_quantize on F32 qwen3moe and olmoe files
        cfg = model.config
        shapes = [(n, tuple(int(d) for d in t.shape)) for n, t in ours.items()]
        mix_model = MixModel("qwen3moe", cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                             cfg.num_experts)
        assert types == mix_tensor_types(file_type, mix_model, shapes)
        return
    hf_qat.remove_qat(model)
    f32 = export_float_gguf(model, str(tmp_path / "f32"), tokenizer)
    theirs_path = tmp_path / "llama-quantize.gguf"
    assert quantize(f32, theirs_path, f"LLAMA_FTYPE_MOSTLY_{file_type.upper()}", nthread=2) == 0
    theirs = gguf_tensors(theirs_path)
    assert types == {n: t.tensor_type.name for n, t in theirs.items()}
    ours_bytes, theirs_bytes = ours_path.stat().st_size, theirs_path.stat().st_size
    assert abs(ours_bytes - theirs_bytes) <= 0.01 * theirs_bytes, (ours_bytes, theirs_bytes)
