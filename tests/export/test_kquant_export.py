"""GGUF exports of the ggml families and of llama.cpp's mixes (presets q4_k_m, q4_k_s, q5_k_m, q6_k):
every tensor has the type llama.cpp's own quantizer gives it in that mix, gguf-py's dequantizer gives back
the QAT weights bit for bit, and the formats that cannot hold these blocks say so. (llama.cpp runs the
exports in test_llama_cpp.)"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import hf_qat
from hf_qat import QATConfig
from hf_qat.model.convert import quantized_weights
from hf_qat.export import ExportFormatError, export_checkpoint, export_float_gguf
from hf_qat.llamacpp.file_types import MIXES
from helpers import byte_level_bpe, tiny_causal_lm
import llama_runtime

FTYPES = {mix: f"LLAMA_FTYPE_MOSTLY_{mix.upper()}" for mix in MIXES}
MODELS = {  # 8 layers: the mixes' use_more_bits layers; 256 wide and tied, or 320 wide (fallbacks) and untied
    "tied-256": dict(hidden_size=256, tie_word_embeddings=True),
    "untied-320": dict(hidden_size=320, tie_word_embeddings=False),
}


def float_model(model_key: str):
    return tiny_causal_lm("llama", sharpen=1.0, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=2, **MODELS[model_key])


def mixed_model(model_key: str, mix: str):
    return hf_qat.ptq(float_model(model_key), QATConfig.from_preset(mix))


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def file_type(path) -> tuple[int, int]:
    """``(general.file_type, general.quantization_version)`` of a GGUF file."""
    fields = gguf.GGUFReader(str(path)).fields
    return tuple(int(fields[key].parts[-1][0]) for key in ("general.file_type", "general.quantization_version"))


@pytest.mark.parametrize("model_key", sorted(MODELS))
@pytest.mark.parametrize("mix", MIXES)
def test_every_tensor_has_the_type_llama_quantize_gives_it(mix, model_key, tmp_path):
    """llama.cpp's quantizer, run at the mix on the F32 GGUF of the same model, gives every tensor the type our
    QAT export has: the file is, tensor by tensor, the one llama-quantize writes."""
    llama_runtime.runtime()  # before the export: skips without llama.cpp (fails under CI=true)
    tokenizer = byte_level_bpe("gpt-2")
    try:
        model = mixed_model(model_key, mix)
    except hf_qat.QATConfigError as refused:  # only where llama.cpp's quantizer stops on the model too
        assert "to fall back to" in str(refused), refused
        f32 = export_float_gguf(float_model(model_key), str(tmp_path / "f32"), tokenizer)
        assert llama_runtime.quantize(f32, tmp_path / "llama-quantize.gguf", FTYPES[mix]) != 0
        return
    export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer)
    ours = tensor_types(tmp_path / "gguf" / "model.gguf")
    hf_qat.remove_qat(model)
    f32 = export_float_gguf(model, str(tmp_path / "f32"), tokenizer)
    assert set(tensor_types(f32).values()) == {"F32"}
    out = tmp_path / "llama-quantize.gguf"
    assert llama_runtime.quantize(f32, out, FTYPES[mix]) == 0
    assert ours == tensor_types(out)
    assert file_type(tmp_path / "gguf" / "model.gguf") == file_type(out)  # e.g. MOSTLY_Q4_K_M, version 2
    quantized = set(ours.values()) - {"F32"}
    assert len(quantized) >= (2 if mix.startswith(("q4_k", "q5_k", "q3_k")) else 1), quantized  # a mix


def test_gguf_py_reads_back_every_qat_weight_exactly(tmp_path):
    model = mixed_model("untied-320", "q4_k_m")
    export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=byte_level_bpe("gpt-2"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf")).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 8)
    cfg = model.config
    seen = set()
    for name, weight in quantized_weights(model):
        baked = weight.weight_quantizer.quantized(weight.weight.detach()).numpy()
        if name.endswith(("q_proj", "k_proj")):  # llama.cpp's row order for rotary pairs
            heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
            baked = baked.reshape(heads, 2, -1, baked.shape[1]).swapaxes(1, 2).reshape(baked.shape)
        tensor = tensors[names.get_name(f"{name}.weight", try_suffixes=(".weight",))]
        back = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(baked.shape)
        assert np.array_equal(back, baked), name
        seen.add(tensor.tensor_type.name)
    assert seen == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}


def test_other_formats_refuse_ggml_blocks_and_auto_picks_gguf(tmp_path):
    model = mixed_model("tied-256", "q4_k_m")
    with pytest.raises(ExportFormatError, match="format='gguf' only"):
        export_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    with pytest.raises(ExportFormatError, match="format='gguf' only"):
        export_checkpoint(model, tmp_path / "native", format="hf-qat")
    with pytest.raises(ExportFormatError, match="tokenizer"):
        export_checkpoint(model, tmp_path / "auto", format="auto")
    info = export_checkpoint(model, tmp_path / "auto", format="auto", tokenizer=byte_level_bpe("gpt-2"))
    assert info.format == "gguf"


def test_the_mix_is_checked_when_the_config_is_built():
    from hf_qat.errors import QATConfigError

    with pytest.raises(QATConfigError, match="gguf_mix"):
        QATConfig(bits=4, method="q4_k", gguf_mix="q3_k_m")
    with pytest.raises(QATConfigError, match="method"):
        QATConfig(bits=4, method="lsq", gguf_mix="q4_k_m")  # lsq is not the mix's base type
    with pytest.raises(QATConfigError, match=r"QATConfig\.bits=8 .*'q6_k' with bits=6"):
        QATConfig(bits=8, gguf_mix="q6_k")
    assert QATConfig(gguf_mix="q6_k") == QATConfig.from_preset("q6_k")  # method "auto": the file type's own
    with pytest.raises(QATConfigError, match="embedding_bits"):
        QATConfig.from_preset("q4_k_m", embedding_bits=8)
    assert QATConfig.from_preset("q6_k").group_size == 16
    assert QATConfig.from_dict(QATConfig.from_preset("q5_k_m").to_dict()).gguf_mix == "q5_k_m"


def test_the_plan_counts_the_bits_the_mix_stores(tmp_path):
    """mean_storage_bits (the planner's bits per weight under a mix) equals the quantized tensors' bytes in
    the GGUF file per weight, and the callback's plan uses it."""
    from hf_qat.model.file_type import mean_storage_bits
    from hf_qat.planner import plan_qat

    model = mixed_model("untied-320", "q4_k_m")
    export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=byte_level_bpe("gpt-2"))
    quantized = [t for t in gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf")).tensors if t.tensor_type.name != "F32"]
    file_bits = 8 * sum(int(t.n_bytes) for t in quantized) / sum(int(t.n_elements) for t in quantized)
    assert mean_storage_bits(model) == pytest.approx(file_bits, rel=1e-12)
    assert 5.0 < file_bits < 6.0  # mostly Q5_0 at this width
    plan = plan_qat(1e6, 1e8, 4, method="q4_k", storage_bits=mean_storage_bits(model))
    assert plan.storage_bits == mean_storage_bits(model) and "mix" in plan.summary()
    assert plan.tokens_per_param_byte == pytest.approx(1e8 / (1e6 * file_bits / 8))


def test_a_mix_trains_through_the_trainer_and_its_plan_counts_the_mix(tmp_path):
    """QATCallback with the q4_k_m preset on a 32-wide Llama (every row llama.cpp's fallback: Q5_0, the tied
    embedding Q8_0): the plan's bits per weight are the mix's and the loss stays finite."""
    from helpers import make_trainer
    from hf_qat.model.file_type import mean_storage_bits

    callback = hf_qat.QATCallback(QATConfig.from_preset("q4_k_m", start=0.5))
    trainer = make_trainer(tmp_path / "run", callbacks=[callback], max_steps=6)
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    assert callback.plan.storage_bits == mean_storage_bits(trainer.model) > 5.5
    kinds = {w.weight_quantizer.quantizer.name for _, w in quantized_weights(trainer.model)}
    assert kinds == {"lsq"}  # Q5_0 and Q8_0 are LSQ grids
    bits = {(w.weight_quantizer.quantizer.bits, w.kind) for _, w in quantized_weights(trainer.model)}
    assert bits == {(5, "linear"), (8, "embedding"), (8, "linear")}  # the tied head is the embedding's Q8_0


def test_a_mix_on_fused_experts_and_the_tied_head_llama_cpp_writes_apart(tmp_path):
    """Qwen3-MoE under q4_k_m: the fused stacks train on their tensors' types (ffn_down_exps Q6_K on llama.cpp's
    use_more_bits layers) and gguf-py reads the stacked blocks back exactly. OLMoE's file holds a tied head as
    its own output.weight, which the mix types apart from token_embd: refused, not trained on one of them."""
    from hf_qat.errors import QATModelError
    from hf_qat.llamacpp.file_types import MixModel, mix_tensor_types

    model = tiny_causal_lm("qwen3_moe", sharpen=1.0, hidden_size=256, intermediate_size=256, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=256, head_dim=64, num_hidden_layers=4,
                           norm_topk_prob=True)
    hf_qat.ptq(model, QATConfig.from_preset("q4_k_m"))
    export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=byte_level_bpe("qwen2"))
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf")).tensors}
    ours = {name: t.tensor_type.name for name, t in tensors.items()}
    rule = mix_tensor_types("q4_k_m", MixModel("qwen3moe", 4, 4, 2, 4),
                            [(name, tuple(int(n) for n in t.shape)) for name, t in tensors.items()])
    assert ours == rule
    assert [ours[f"blk.{i}.ffn_down_exps.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    experts = model.model.layers[2].mlp.experts
    baked = experts.down_proj_quantizer.quantized(experts.down_proj.detach()).numpy()  # [E, out, in]
    down = tensors["blk.2.ffn_down_exps.weight"]
    assert np.array_equal(gguf.quants.dequantize(down.data, down.tensor_type).reshape(baked.shape), baked)

    olmoe = tiny_causal_lm("olmoe", sharpen=1.0, hidden_size=256, intermediate_size=256, num_experts=4,
                           num_experts_per_tok=2, num_key_value_heads=4)
    with pytest.raises(QATModelError, match="output.weight"):
        hf_qat.prepare_model_for_qat(olmoe, QATConfig.from_preset("q4_k_m"))


def test_a_gguf_with_float_weights_says_what_llama_cpps_file_would_hold(tmp_path):
    """An int4 g32 model without a file type: its tied embedding goes to the GGUF in F32. The export says so, with
    the size of llama.cpp's Q4_0 file of the same model (as llama_model_quantize writes it) and the preset."""
    tokenizer = byte_level_bpe("gpt-2")
    model = hf_qat.ptq(tiny_causal_lm("llama", sharpen=1.0, hidden_size=256, intermediate_size=512),
                       QATConfig.from_preset("w4g32", scale_dtype="float16"))
    info = export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer)
    note = next(n for n in info.notes if "written in float" in n)
    assert "token_embd.weight" in note and "from_preset('q4_0')" in note
    hf_qat.remove_qat(model)
    f32 = export_float_gguf(model, str(tmp_path / "f32"), tokenizer)
    out = tmp_path / "q4_0.gguf"
    assert llama_runtime.quantize(f32, out, "LLAMA_FTYPE_MOSTLY_Q4_0") == 0
    llama_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(out)).tensors)
    assert f"Q4_0 file of this model is {llama_bytes / 1e6:.1f} MB" in note
    mixed = export_checkpoint(mixed_model("tied-256", "q4_0"), tmp_path / "mix", format="gguf", tokenizer=tokenizer)
    assert not any("written in float" in n for n in mixed.notes)  # the file type's file: nothing left over


def test_float_leftovers_of_a_model_llama_cpp_cannot_quantize_are_reported_not_raised(tmp_path):
    """Q1_0 weights with the 320-wide down projections left in float (as the width error advises): llama.cpp's
    quantizer stops on this model's Q1_0 file (no fallback for blocks of 128), so the note says that, and the
    export, written, does not fail on a field the user never set."""
    model = hf_qat.ptq(tiny_causal_lm("llama", sharpen=1.0, hidden_size=256, intermediate_size=320,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                       QATConfig(method="q1_0", bits=1, exclude_modules=["down_proj"]))
    info = export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=byte_level_bpe("gpt-2"))
    note = next(n for n in info.notes if "written in float" in n)
    assert "blk.0.ffn_down.weight" in note and "cannot write a Q1_0 file of this model" in note
    assert (tmp_path / "gguf" / "model.gguf").exists()
