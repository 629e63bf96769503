"""Where llama.cpp's file types, PEFT, low-precision weights and the export formats meet: each case a user hit,
each must either work exactly or be refused with advice that works when followed."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import hf_qat
from hf_qat import QATCallback, QATConfig, QATModelError
from hf_qat.model.convert import quantized_weights
from hf_qat.export import ExportFormatError, export_checkpoint, load_exported
from helpers import byte_level_bpe, make_trainer, tiny_causal_lm, tiny_llama, tiny_moe

peft = pytest.importorskip("peft")


def unit_types(model) -> dict[str, tuple[str, int]]:
    """Each quantized weight's (method, bits), by its transformers name (PEFT's wrapping removed)."""
    return {name.removeprefix("base_model.model.").replace(".base_layer", ""):
            (qw.weight_quantizer.quantizer.name, qw.weight_quantizer.quantizer.bits)
            for name, qw in quantized_weights(model)}


def wide_llama(hidden: int = 256, tie: bool = True):
    return tiny_causal_lm("llama", sharpen=1.0, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)


def gguf_weights(path, model, dtype) -> dict[str, torch.Tensor]:
    """Every quantized weight of ``model`` as gguf-py dequantizes the file (fp32, in transformers' row order),
    then cast once to ``dtype``, by weight name."""
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out = {}
    for name, qw in quantized_weights(model):
        tensor = tensors.get(names.get_name(f"{name}.weight", try_suffixes=(".weight",)))
        if tensor is None:  # a tied head: llama.cpp reads token_embd
            continue
        shape = tuple(qw.weight.shape)
        back = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if name.endswith(("q_proj", "k_proj")):  # undo llama.cpp's row order for rotary pairs
            heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
            back = back.reshape(heads, -1, 2, shape[1]).swapaxes(1, 2).reshape(shape)
        out[name] = torch.from_numpy(np.ascontiguousarray(back)).to(dtype)
    return out


# ---------------------------------------------------------------------------------------- 1. PEFT and a file type
def test_peft_lora_trains_each_weight_on_the_type_of_its_file_type(tmp_path):
    """PEFT's names (``base_model.model.`` prefix, ``.base_layer``) are the transformers model's to llama.cpp's
    rule: every weight under LoRA gets the type it gets without LoRA, and the merged model exports that file."""
    cfg = QATConfig.from_preset("q4_k_m", start=0)
    plain = hf_qat.prepare_model_for_qat(wide_llama(), cfg)
    lora = peft.get_peft_model(wide_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                                  "down_proj"]))
    hf_qat.prepare_model_for_qat(lora, cfg)
    expected = unit_types(plain)
    assert unit_types(lora) == expected
    assert {("q4_k", 4), ("q6_k", 6)} <= set(expected.values())  # a mix, not one type
    hf_qat.activate_qat(lora)
    batch = torch.randint(0, 320, (2, 8))
    lora(input_ids=batch, labels=batch).loss.backward()
    info = export_checkpoint(lora.merge_and_unload(), tmp_path / "out", tokenizer=byte_level_bpe("gpt-2"))
    assert info.format == "gguf"
    hf_qat.activate_qat(plain)
    export_checkpoint(plain, tmp_path / "plain", tokenizer=byte_level_bpe("gpt-2"))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "out" / "model.gguf")).tensors}
    assert types == {t.name: t.tensor_type.name
                     for t in gguf.GGUFReader(str(tmp_path / "plain" / "model.gguf")).tensors}


# ---------------------------------------------------------------------------------------- 2. auto and a file type
@pytest.mark.parametrize("mix, types", [("q4_k_m", {"Q5_0", "Q8_0"}), ("q6_k", {"Q8_0"})])
def test_auto_writes_the_gguf_of_a_file_type_without_k_quant_layers(mix, types, tmp_path):
    """At 64 wide llama.cpp falls back to Q5_0 / Q8_0 everywhere: no k-quant layer is left, and a Q8_0-only
    model would fit compressed-tensors, but the user trained llama.cpp's file: auto writes GGUF."""
    model = hf_qat.ptq(wide_llama(hidden=64), QATConfig.from_preset(mix))
    info = export_checkpoint(model, tmp_path / "auto", format="auto", tokenizer=byte_level_bpe("gpt-2"))
    assert info.format == "gguf"
    written = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "auto" / "model.gguf")).tensors}
    assert written - {"F32"} == types


# ---------------------------------------------------------------------------------------- 3. exclude_modules
@pytest.mark.parametrize("cfg", [dict(bits=4, group_size=32, embedding_bits=8), dict(preset="q4_k_m")],
                         ids=["embedding_bits", "gguf_mix"])
def test_exclude_modules_keeps_the_embedding_and_the_head_in_float(cfg, caplog):
    exclude = ["lm_head", "embed_tokens"]
    preset = cfg.pop("preset", None)
    config = (QATConfig.from_preset(preset, exclude_modules=exclude) if preset else
              QATConfig(exclude_modules=exclude, **cfg))
    model = hf_qat.prepare_model_for_qat(wide_llama(tie=False), config)
    names = {name for name, _ in quantized_weights(model)}
    assert names and not names & {"lm_head", "model.embed_tokens"}
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    quantized = hf_qat.prepare_model_for_qat(wide_llama(tie=False), QATConfig(**cfg) if not preset else
                                             QATConfig.from_preset(preset))
    assert {"lm_head", "model.embed_tokens"} <= {name for name, _ in quantized_weights(quantized)}


def test_excluding_one_of_a_tied_pair_is_refused_naming_both():
    with pytest.raises(QATModelError, match=r"names lm_head but not model\.embed_tokens.*tied.*Exclude both"):
        hf_qat.prepare_model_for_qat(wide_llama(tie=True), QATConfig(bits=4, group_size=32, embedding_bits=8,
                                                                   exclude_modules=["lm_head"]))
    both = hf_qat.prepare_model_for_qat(wide_llama(tie=True), QATConfig(bits=4, group_size=32, embedding_bits=8,
                                                                      exclude_modules=["lm_head", "embed_tokens"]))
    assert "model.embed_tokens" not in {name for name, _ in quantized_weights(both)}


# ---------------------------------------------------------------------------------------- 4. low-precision weights
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("preset", ["q4_k_m", "w4g32", "mxfp4"])
def test_a_low_precision_model_and_its_files_hold_the_same_weights(preset, dtype, tmp_path):
    """The GGUF holds the fp32 value each weight dequantizes to, which the QAT forward computes too and rounds
    once to the model's dtype: read back in that dtype it is the QAT weight bit for bit, and the export says
    so. The native format reloads the same weights; compressed-tensors reproduces them or refuses."""
    model = wide_llama().to(dtype)
    hf_qat.ptq(model, QATConfig.from_preset(preset, scale_dtype="float16") if preset == "w4g32"
               else QATConfig.from_preset(preset))
    qat = {name: qw.weight_quantizer.quantized(qw.weight.detach()) for name, qw in quantized_weights(model)}
    assert all(w.dtype == dtype for w in qat.values())
    info = export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=byte_level_bpe("gpt-2"))
    back = gguf_weights(tmp_path / "gguf" / "model.gguf", model, dtype)
    assert back and all(torch.equal(back[name], qat[name]) for name in back), [n for n in back
                                                                              if not torch.equal(back[n], qat[n])]
    assert any(f"computes in {str(dtype).removeprefix('torch.')}" in note for note in info.notes), info.notes
    if preset != "q4_k_m":  # the ggml families are GGUF's alone (test_kquant_export)
        export_checkpoint(model, tmp_path / "native", format="hf-qat")
        reloaded = dict(load_exported(tmp_path / "native").named_modules())
        for name, weight in qat.items():
            assert torch.equal(reloaded[name].dequantize(), weight), name


# ---------------------------------------------------------------------------------------- 5. nothing to train
def test_a_file_type_that_leaves_every_weight_in_float_is_an_error_that_says_why(tmp_path):
    """48 and 80 wide: llama.cpp's Q4_K_M keeps every tensor in F16; the planner must not divide by zero."""
    model = tiny_llama(hidden=48)
    model.config.intermediate_size = 80
    model = type(model)._from_config(model.config)
    cb = QATCallback(QATConfig.from_preset("q4_k_m", start="auto"))
    with pytest.raises(QATModelError, match=r"keeps every weight of this model in float.*nothing for QAT to train"):
        make_trainer(tmp_path, callbacks=[cb], model=model, max_steps=4)


# ---------------------------------------------------------------------------------------- 6. advice that works
def test_a_file_type_on_an_architecture_without_gguf_advises_a_config_that_trains(tmp_path):
    with pytest.raises(QATModelError, match=r"gguf_mix.*writes no GGUF.*without gguf_mix") as refused:
        hf_qat.prepare_model_for_qat(tiny_moe("qwen2_moe", moe_intermediate_size=32), QATConfig.from_preset("q4_k_m"))
    assert "Formats that can" not in str(refused.value)
    advice = "QATConfig(bits=4, group_size=32, export_format='compressed-tensors')"
    assert advice in str(refused.value)
    bf16 = tiny_moe("qwen2_moe", moe_intermediate_size=32, dtype=torch.bfloat16)  # as transformers 5 loads models
    model = hf_qat.ptq(bf16, eval(advice))  # the advice, followed
    assert export_checkpoint(model, tmp_path / "ct", format="compressed-tensors").format == "compressed-tensors"


def test_width_errors_advise_only_what_trains():
    with pytest.raises(QATModelError, match="not a multiple of mxfp4's block") as mxfp4:
        hf_qat.prepare_model_for_qat(tiny_llama(hidden=48), QATConfig.from_preset("mxfp4"))
    assert "gguf_mix" not in str(mxfp4.value) and "from_preset" not in str(mxfp4.value)
    with pytest.raises(QATModelError, match=r"from_preset\('q4_k_m'\)"):
        hf_qat.prepare_model_for_qat(wide_llama(hidden=64), QATConfig(bits=4, method="q4_k"))
    assert list(quantized_weights(hf_qat.prepare_model_for_qat(wide_llama(hidden=64),
                                                               QATConfig.from_preset("q4_k_m"))))
    with pytest.raises(QATModelError, match="exclude_modules") as narrow:  # 48: no fallback type trains it
        hf_qat.prepare_model_for_qat(tiny_llama(hidden=48), QATConfig(bits=4, method="q4_k"))
    assert "from_preset" not in str(narrow.value)


def test_a_gguf_refusal_names_only_formats_that_can(tmp_path):
    """An architecture GGUF cannot write: LSQ layers are advised to the formats that hold them; llama.cpp's
    block types, which no other format holds, are advised to train for another format."""
    model = hf_qat.ptq(tiny_moe("qwen2_moe", moe_intermediate_size=32), QATConfig(bits=4, group_size=32))
    with pytest.raises(ExportFormatError, match=r"this model is 'qwen2_moe'\. Formats that can: .*hf-qat"):
        export_checkpoint(model, tmp_path / "g", format="gguf", tokenizer=byte_level_bpe("gpt-2"))
    k = hf_qat.ptq(tiny_causal_lm("gemma2", hidden_size=256, intermediate_size=512, head_dim=64,
                                  hidden_activation="gelu"), QATConfig(bits=4, method="q4_k"))
    with pytest.raises(ExportFormatError, match=r"tanh GELU.*No other format can hold these layers") as refused:
        export_checkpoint(k, tmp_path / "k", format="gguf", tokenizer=byte_level_bpe("gpt-2"))
    assert "Formats that can" not in str(refused.value)



def test_a_quantized_scaled_embedding_goes_to_gguf_and_the_native_format_refuses_it(tmp_path):
    """The native format packs a plain embedding: Gemma's, whose rows are scaled by sqrt(hidden), would load and
    compute something else, so it is refused, naming GGUF (whose Gemma graph scales them)."""
    config = QATConfig(bits=4, group_size=32, embedding_bits=4)
    model = hf_qat.ptq(tiny_causal_lm("gemma2", head_dim=16, query_pre_attn_scalar=16), config)
    with pytest.raises(ExportFormatError, match=r"multiplies its rows by 8 .*Formats that can: gguf"):
        export_checkpoint(model, tmp_path / "n", format="hf-qat")
    with pytest.raises(ExportFormatError, match="multiplies its rows by 8"):  # before training
        hf_qat.prepare_model_for_qat(tiny_causal_lm("gemma2", head_dim=16, query_pre_attn_scalar=16),
                                     QATConfig(bits=4, group_size=32, embedding_bits=4, export_format="hf-qat"))
    info = export_checkpoint(model, tmp_path / "g", format="auto", tokenizer=byte_level_bpe("gpt-2"))
    assert info.format == "gguf" and (tmp_path / "g" / "model.gguf").is_file()  # the one format that holds it
    assert "format='auto' chose 'gguf': the first format that holds every layer exactly" in info.notes
    assert not any("passed over 'gguf'" in note for note in info.notes)

# ---------------------------------------------------------------------------------------- fuzz of the new options
FUZZ_OPTIONS = {
    "bits": [2, 3, 4, 5, 6, 8, "ternary"],
    "method": ["auto", "lsq", "seq", "mxfp4", "nvfp4", "q4_k", "q6_k", "iq4_nl", "q5_1"],
    "gguf_mix": [None, None, "q4_k_m", "q4_k_s", "q5_k_m", "q6_k", "q4_0", "q8_0", "q3_k_m", "iq4_xs", "tq2_0",
                 "mxfp4_moe", "Q4_1"],
    "moe_params": ["total", "active"],
    "scale_init": ["max", "mse"],
    "embedding_bits": [None, None, 4, 8],
    "embedding_method": ["lsq", "mxfp4"],
    "exclude_modules": [["lm_head"], ["embed_tokens"], ["lm_head", "embed_tokens"], ["q_proj"], ["mlp.experts"],
                        ["o_proj", "lm_head", "embed_tokens"]],
}
FUZZ_MODELS = {
    "tied-256": lambda: wide_llama(256, tie=True),
    "untied-64": lambda: wide_llama(64, tie=False),
    "qwen3_moe": lambda: tiny_moe("qwen3_moe", moe_intermediate_size=32),
}
FIELDS = set(QATConfig.__dataclass_fields__)


def _names_a_field(exc: Exception) -> bool:
    """A config error names its field; a model's refusal names the option to change (not merely "bits")."""
    if isinstance(exc, hf_qat.QATConfigError):
        return exc.field.split(".")[0] in FIELDS
    return any(field in str(exc) for field in FIELDS - {"bits", "method", "start"})


def _exact(model, fmt: str, directory, dtype=torch.float32) -> None:
    """The export computes what the QAT model computes: GGUF's weights as gguf-py dequantizes them, the other
    formats' logits after a reload."""
    if fmt == "gguf":
        qat = {name: qw.weight_quantizer.quantized(qw.weight.detach()) for name, qw in quantized_weights(model)}
        back = gguf_weights(directory / "model.gguf", model, dtype) if model.config.model_type == "llama" else {}
        assert all(torch.equal(back[name], qat[name]) for name in back)
        return
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(ids).logits, load_exported(directory)(ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_fuzz_of_the_new_options_installs_and_exports_exactly_or_names_the_field(tmp_path):
    """The options added for mixes, FP4, k-quants and experts, drawn together at random: a config either installs
    on a tiny model and exports exactly (format="auto"), or its refusal names a QATConfig field."""
    import random

    rng = random.Random(23)
    outcomes = {"exported": 0, "refused": 0}
    for case in range(36):
        data = {key: rng.choice(values) for key, values in FUZZ_OPTIONS.items() if rng.random() < 0.45}
        if rng.random() < 0.3:  # a preset, as users write them
            data = {**{k: v for k, v in data.items() if k not in ("bits", "method", "gguf_mix")},
                    **QATConfig.from_preset(rng.choice(["q4_k_m", "q6_k", "mxfp4", "w4g32", "nvfp4"])).to_dict()}
        model_key = rng.choice(sorted(FUZZ_MODELS))
        try:
            config = QATConfig.from_dict(data)
            model = hf_qat.ptq(FUZZ_MODELS[model_key](), config)
        except (hf_qat.QATConfigError, QATModelError) as exc:
            assert _names_a_field(exc), (data, model_key, str(exc))
            outcomes["refused"] += 1
            continue
        out = tmp_path / str(case)
        try:
            info = export_checkpoint(model, out, format="auto", tokenizer=byte_level_bpe("gpt-2"))
        except ExportFormatError as exc:  # nothing holds it: the refusal says what to train instead
            assert "QATConfig(" in str(exc) or "Formats that can" in str(exc), (data, model_key, str(exc))
            outcomes["refused"] += 1
            continue
        assert info.format == "gguf" or config.gguf_mix is None, (data, info.format)  # a file type is a GGUF
        _exact(model, info.format, out)
        outcomes["exported"] += 1
        outcomes[info.format] = outcomes.get(info.format, 0) + 1
    assert outcomes["exported"] >= 8 and outcomes["refused"] >= 4 and outcomes.get("gguf", 0) >= 2, outcomes


def test_file_types_hf_qat_cannot_train_are_refused_by_name():
    for name, reason in [("iq2_xs", "codebook"), ("IQ3_M", "codebook"), ("q2_k_s", "importance matrix"),
                         ("q2_0", "gguf-py .* has no Q2_0 type"), ("nvfp4", "no default type")]:
        with pytest.raises(hf_qat.QATConfigError, match=rf"QATConfig\.gguf_mix=.*{reason}") as refused:
            QATConfig(gguf_mix=name)
        assert "q4_k_m" in refused.value.allowed  # the list of what can be trained
    with pytest.raises(hf_qat.QATConfigError, match=r"gguf_mix='q9_k'.*allowed: None, q4_0"):
        QATConfig(gguf_mix="q9_k")
    for wrong, field in [(dict(scale_dtype="bfloat16"), "scale_dtype"), (dict(export_format="compressed-tensors"),
                                                                         "export_format")]:
        with pytest.raises(hf_qat.QATConfigError) as refused:
            QATConfig.from_preset("q4_0", **wrong)
        assert refused.value.field == field


def test_the_export_target_checks_biases_before_training():
    """BitNet's BitLinear has no bias: a Qwen2 (q/k/v biases) aimed at it is refused when the layers are installed."""
    with pytest.raises(ExportFormatError, match=r"export_format='bitnet'.*bias"):
        hf_qat.prepare_model_for_qat(tiny_causal_lm("qwen2"), QATConfig.from_preset("ternary-bitnet",
                                                                                  export_format="bitnet"))
