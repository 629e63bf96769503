"""Each export format: train a tiny model with QAT, export, reload WITHOUT hf_qat in a fresh process
(native format: with it), and get the QAT model's logits; sizes match the bit budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_qat
from hf_qat import QATConfig
from hf_qat.demo.corpus import train_tokenizer
from hf_qat.export import collect_layers, export_checkpoint, load_exported
from hf_qat.errors import ExportFormatError
from helpers import byte_level_bpe, logits_in_fresh_process, qat_trained_model

INPUT = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n" * 40, "class A:\n    pass\n" * 40], 320)


def reference_logits(model):
    with torch.no_grad():
        return model(INPUT).logits


def assert_size(info):
    assert info.expected_bytes > 0
    assert abs(info.weight_bytes - info.expected_bytes) <= 0.05 * info.expected_bytes, (info.weight_bytes, info.expected_bytes)


@pytest.mark.parametrize("cfg,model_kwargs", [
    (dict(bits=4, group_size=32), dict(hidden=64)),
    (dict(bits=8, group_size="channel"), dict()),
    (dict(bits=2, group_size=16), dict()),  # SEQ 2-bit on the 4-bit grid, step s/4
], ids=["lsq4-g32", "lsq8-channel", "seq2-g16"])
def test_compressed_tensors_reloads_without_hf_qat(cfg, model_kwargs, tmp_path):
    model = qat_trained_model(QATConfig(start=0, **cfg), **model_kwargs)
    info = export_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    assert info.exact and info.format == "compressed-tensors"
    got = logits_in_fresh_process(tmp_path / "ct", "compressed-tensors", INPUT, tmp_path)
    torch.testing.assert_close(got, reference_logits(model), rtol=0, atol=1e-5)
    assert_size(info)


def test_native_format_every_setting_and_tied_embeddings(tmp_path):
    for i, cfg in enumerate([dict(bits=1, group_size="channel"), dict(bits="ternary", group_size=8, activation_bits=8),
                             dict(bits=3, group_size=16, embedding_bits=5), dict(bits=6, group_size="tensor", embedding_bits=8)]):
        model = qat_trained_model(QATConfig(start=0, **cfg), tie=True)
        out = tmp_path / f"native{i}"
        info = export_checkpoint(model, out, format="hf-qat")
        reloaded = load_exported(out)
        with torch.no_grad():
            assert torch.equal(reloaded(INPUT).logits, reference_logits(model)), cfg
        assert_size(info)
        if cfg.get("embedding_bits"):
            assert reloaded.lm_head.embedding is reloaded.model.embed_tokens  # the tie survives, stored once



def test_a_native_export_refuses_to_load_where_hf_qat_is_not_imported(tmp_path):
    """transformers ignores a quant_method it does not know and would fill the packed layers with random weights:
    the guard tensor makes that load fail (a size mismatch), and hf_qat's own load skips it."""
    model = qat_trained_model(QATConfig(start=0, bits=3, group_size=16))
    export_checkpoint(model, tmp_path / "native", format="hf-qat")
    with pytest.raises(AssertionError, match="ignore_mismatched_sizes"):
        logits_in_fresh_process(tmp_path / "native", "hf-qat", INPUT, tmp_path)
    guard = json.loads((tmp_path / "native" / "config.json").read_text())["quantization_config"]["guard"]
    assert guard == "model.layers.0.self_attn.q_proj.weight"
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "native")(INPUT).logits, reference_logits(model))
    # a loaded native checkpoint saved again keeps its guard
    AutoModelForCausalLM.from_pretrained(tmp_path / "native").save_pretrained(tmp_path / "again")
    with pytest.raises(AssertionError, match="ignore_mismatched_sizes"):
        logits_in_fresh_process(tmp_path / "again", "hf-qat", INPUT, tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "again")(INPUT).logits, reference_logits(model))


def test_bitnet_reloads_without_hf_qat(tmp_path):
    model = qat_trained_model(QATConfig(start=0, bits="ternary", group_size="tensor", activation_bits=8))
    info = export_checkpoint(model, tmp_path / "bitnet", format="bitnet")
    assert info.exact and not info.notes
    got = logits_in_fresh_process(tmp_path / "bitnet", "bitnet", INPUT, tmp_path)
    torch.testing.assert_close(got, reference_logits(model), rtol=1e-5, atol=1e-5)
    assert_size(info)


def test_bitnet_without_activation_quantization_says_so(tmp_path):
    model = qat_trained_model(QATConfig(start=0, bits="ternary", group_size="tensor"))
    info = export_checkpoint(model, tmp_path / "bitnet", format="bitnet")
    assert not info.exact and "int8 per token" in info.notes[0]
    assert "int8 per token" in (tmp_path / "bitnet" / "README.md").read_text()


def _gguf_blocks(raw: np.ndarray, qtype: str):
    """Independent reading of GGUF blocks: (d per block, integer codes)."""
    if qtype == "Q4_0":
        blocks = raw.reshape(-1, 18)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        qs = blocks[:, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int16) - 8
        return d, q
    if qtype == "Q8_0":
        blocks = raw.reshape(-1, 34)
        return blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0], blocks[:, 2:].copy().view(np.int8).astype(np.int16)
    if qtype == "TQ1_0":  # trit i of a byte: (byte * 3^i mod 256) * 3 >> 8 (ggml's dequantize_row_tq1_0)
        blocks = raw.reshape(-1, 54)
        d = blocks[:, 52:].copy().view(np.float16).astype(np.float32)[:, 0]
        trits = lambda b, n: np.stack([((b.astype(np.uint16) * 3 ** i % 256) * 3) >> 8 for i in range(n)], 1)  # noqa: E731
        q = np.concatenate([trits(blocks[:, :32], 5).reshape(-1, 160), trits(blocks[:, 32:48], 5).reshape(-1, 80),
                            trits(blocks[:, 48:52], 4).reshape(-1, 16)], axis=1)
        return d, q.astype(np.int16) - 1
    blocks = raw.reshape(-1, 66)
    d = blocks[:, 64:].copy().view(np.float16).astype(np.float32)[:, 0]
    qs = blocks[:, :64].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return d, (qs & 3).reshape(-1, 256).astype(np.int16) - 1


@pytest.mark.parametrize("cfg,model_kwargs,qtype", [
    (dict(bits=4, group_size=32, embedding_bits=4), dict(hidden=64, tie=True, vocab=320), "Q4_0"),
    (dict(bits=8, group_size=32), dict(hidden=64, tie=False, vocab=320), "Q8_0"),
    (dict(bits="ternary", group_size=256), dict(hidden=256, tie=True, vocab=320), "TQ2_0"),
    (dict(bits="ternary", group_size=256), dict(hidden=256, tie=True, vocab=320), "TQ1_0"),
])
def test_gguf_blocks_read_back_and_transformers_reproduces_logits(cfg, model_kwargs, qtype, tokenizer, tmp_path):
    import gguf

    model = qat_trained_model(QATConfig(start=0, scale_dtype="float16", **cfg), **model_kwargs)
    options = {"ternary_type": qtype} if qtype.startswith("TQ") else None
    info = export_checkpoint(model, tmp_path / "gguf", format="gguf", tokenizer=tokenizer, format_options=options)
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    layer = model.model.layers[1].mlp.down_proj  # not permuted: rows in the HF order
    codes, step = layer.weight_quantizer.codes(layer.weight)
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type.name == qtype
    d, q = _gguf_blocks(np.asarray(t.data).reshape(-1), qtype)
    block = 256 if qtype.startswith("TQ") else 32
    assert np.array_equal(q.reshape(codes.shape), codes.numpy())
    assert np.array_equal(d.reshape(step.shape), step.numpy())
    dequantized = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(layer.weight.shape)
    assert np.array_equal(dequantized, layer.weight_quantizer.quantized(layer.weight).numpy())
    assert d.size == codes.numel() // block  # one scale per block of 32 (256 for TQ1_0 / TQ2_0)
    assert ("output.weight" in tensors) == (not model_kwargs["tie"])
    got = logits_in_fresh_process(tmp_path / "gguf", "gguf", INPUT, tmp_path)
    torch.testing.assert_close(got, reference_logits(model), rtol=0, atol=1e-5)
    assert_size(info)


def test_auto_picks_a_format_that_serves_without_hf_qat(tmp_path):
    model = qat_trained_model(QATConfig(start=0, bits=4, group_size=16))
    assert export_checkpoint(model, tmp_path / "a", format="auto").format == "compressed-tensors"
    model = qat_trained_model(QATConfig(start=0, bits="ternary", group_size="tensor", activation_bits=8))
    assert export_checkpoint(model, tmp_path / "b", format="auto").format == "bitnet"
    model = qat_trained_model(QATConfig(start=0, bits=3, group_size=16, embedding_bits=4))
    assert export_checkpoint(model, tmp_path / "c", format="auto").format == "hf-qat"


def test_the_format_registry_refuses_a_duplicate_name_and_drives_auto():
    from hf_qat.export import FORMATS, choose_format
    from hf_qat.export.base import ExportFormat
    from hf_qat.export_formats import register_format

    class Impostor(ExportFormat):
        name = "gguf"

    with pytest.raises(ValueError, match="'gguf' is already registered"):
        register_format(Impostor)
    assert FORMATS["gguf"].__name__ == "GGUFFormat"

    class Always(ExportFormat):
        name = "test-always"
        auto_priority = -1

        def problem(self, layer):
            return None

    register_format(Always)
    try:
        layers, _ = collect_layers(qat_trained_model(QATConfig(start=0, bits=4, group_size=16)))
        assert choose_format(layers)[0] == "test-always"  # "auto" asks the registry, in priority order
    finally:
        del FORMATS["test-always"]
    assert choose_format(layers) == ("compressed-tensors", [])


def test_gguf_refuses_rope_scaling_llama_cpp_would_not_reproduce_and_writes_llama3_factors(tokenizer, tmp_path):
    import gguf

    from hf_qat.errors import ExportFormatError
    from hf_qat.llamacpp.architectures import llama3_rope_factors

    model = qat_trained_model(QATConfig(start=0, bits=4, group_size=32), hidden=64, vocab=320)
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ExportFormatError, match=r"rope types default, llama3; this model's is 'linear'"):
        export_checkpoint(model, tmp_path / "linear", format="gguf", tokenizer=tokenizer)
    assert not (tmp_path / "linear" / "model.gguf").exists()
    model.config.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    export_checkpoint(model, tmp_path / "llama3", format="gguf", tokenizer=tokenizer)
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "llama3" / "model.gguf")).tensors}
    factors = np.asarray(tensors["rope_freqs.weight"].data)
    assert factors.shape == (8,) and np.array_equal(factors, llama3_rope_factors(model.config).numpy())
    # short wavelengths keep their frequency, long ones are divided by the factor, the middle is blended
    assert factors[0] == 1.0 and factors[-1] == 8.0 and all(a <= b for a, b in zip(factors, factors[1:]))


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "smollm"])
def test_gguf_names_the_pre_tokenizer_of_the_tokenizer(pre):
    import json as json_module

    from hf_qat.llamacpp.vocab import pre_tokenizer_name

    spec = json_module.loads(byte_level_bpe(pre).backend_tokenizer.to_str())
    assert pre_tokenizer_name(spec["pre_tokenizer"]) == pre


def test_gguf_refuses_an_unknown_pre_tokenizer(tmp_path):
    from hf_qat.errors import ExportFormatError

    model = qat_trained_model(QATConfig(start=0, bits=4, group_size=32), hidden=64, vocab=320)
    with pytest.raises(ExportFormatError, match=r"knows the pre-tokenizers gpt-2.*\(WhitespaceSplit\)"):
        export_checkpoint(model, tmp_path / "ws", format="gguf", tokenizer=byte_level_bpe("whitespace"))
    assert not (tmp_path / "ws").exists()


def test_gguf_refuses_architectures_and_windows_llama_cpp_would_not_reproduce(tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_qat.errors import ExportFormatError

    def qat(model_type, **extra):
        config = AutoConfig.for_model(model_type, vocab_size=320, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, **extra)
        model = hf_qat.prepare_model_for_qat(AutoModelForCausalLM.from_config(config), QATConfig(bits=4, start=0))
        hf_qat.activate_qat(model)
        return model

    gemma = dict(head_dim=16, query_pre_attn_scalar=16)
    refused = [
        (("phi3", dict(pad_token_id=0)), r"writes llama, mistral, qwen2, qwen3, mixtral, qwen3_moe, olmoe, gemma2, gemma3_text; this model is 'phi3'"),
        (("mistral", dict(sliding_window=32)), r"sliding window of 32 tokens"),
        (("gemma2", dict(head_dim=16)), r"queries by 1/sqrt\(16\).*query_pre_attn_scalar is 256"),
        (("gemma2", dict(gemma, final_logit_softcapping=None)), r"always soft-caps.*final_logit_softcapping is None"),
        (("gemma2", dict(gemma, tie_word_embeddings=False)), r"LM head is untied"),
        (("gemma2", dict(gemma, layer_types=["full_attention"])), r"needs sliding-window layers"),
        (("gemma3_text", dict(gemma, attn_logit_softcapping=50.0)), r"does not soft-cap attention logits"),
        (("gemma3_text", dict(gemma, hidden_activation="gelu")), r"tanh GELU; this model's activation is 'gelu'"),
        (("gemma3_text", dict(gemma, rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 2.0},
                                                      "sliding_attention": {"rope_type": "default"}})),
         r"rope types default, linear on its global layers; this model's is 'yarn'"),
    ]
    for (model_type, *extra), message in refused:
        with pytest.raises(ExportFormatError, match=message):
            export_checkpoint(qat(model_type, **(extra[0] if extra else {})), tmp_path / "x", format="gguf",
                              tokenizer=tokenizer)
        assert not (tmp_path / "x").exists()


def test_int8_activations_export_exactly_or_are_refused_with_the_reason(tmp_path):
    from hf_qat.errors import ExportFormatError

    model = qat_trained_model(QATConfig.from_preset("a8w4", start=0))
    with pytest.raises(ExportFormatError, match=r"int8 activations: compressed-tensors rounds x / \(max\|x\| / 127\)"):
        export_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct" / "config.json").exists()
    info = export_checkpoint(model, tmp_path / "auto", format="auto")  # the native format keeps them exactly
    assert info.format == "hf-qat"
    with torch.no_grad():
        assert torch.equal(load_exported(tmp_path / "auto")(INPUT).logits, reference_logits(model))


def test_gguf_format_options_are_checked_before_writing(tokenizer, tmp_path):
    model = qat_trained_model(QATConfig(start=0, bits="ternary", group_size=256), hidden=256, tie=True, vocab=320)
    with pytest.raises(ExportFormatError, match=r"'ternary_type'\]='TQ3_0' is not allowed.*TQ2_0, TQ1_0"):
        export_checkpoint(model, tmp_path / "a", format="gguf", tokenizer=tokenizer, format_options={"ternary_type": "TQ3_0"})
    with pytest.raises(ExportFormatError, match="'block' is not an option of format 'gguf' \\(its options: ternary_type\\)"):
        export_checkpoint(model, tmp_path / "b", format="gguf", tokenizer=tokenizer, format_options={"block": "64"})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    tq1 = export_checkpoint(model, tmp_path / "tq1", format="gguf", tokenizer=tokenizer, format_options={"ternary_type": "TQ1_0"})
    tq2 = export_checkpoint(model, tmp_path / "tq2", format="gguf", tokenizer=tokenizer)
    quantized = sum(m.weight.numel() for _, m in hf_qat.qat_modules(model))
    assert tq2.weight_bytes - tq1.weight_bytes == quantized // 256 * (66 - 54)  # 12 bytes less per block of 256


def test_gguf_sentencepiece_tokenizers_are_recognised_and_incomplete_merges_refused(tmp_path):
    import json

    from transformers import GemmaTokenizer

    from hf_qat.llamacpp.vocab import sentencepiece_prefix
    from helpers import sentencepiece_bpe

    spec = lambda tok: json.loads(tok.backend_tokenizer.to_str())  # noqa: E731
    assert sentencepiece_prefix(spec(sentencepiece_bpe())) is False  # Gemma: no "▁" prefix
    assert sentencepiece_prefix(spec(sentencepiece_bpe(prefix=True))) is True  # Llama-2
    assert sentencepiece_prefix(spec(byte_level_bpe("gpt-2"))) is None

    complete = sentencepiece_bpe()
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in spec(complete)["model"]["merges"]]
    vocab = spec(complete)["model"]["vocab"]
    dropped = next(m for m in merges if len(m[0]) > 1 and len(m[1]) > 1)  # a merge of two multi-character tokens
    incomplete = GemmaTokenizer(vocab=vocab, merges=[m for m in merges if m != dropped], add_bos_token=True)
    model = qat_trained_model(QATConfig(start=0, bits=4, group_size=32), hidden=64, vocab=400)
    with pytest.raises(ExportFormatError, match=f"splits into the tokens {dropped[0]!r} \\+ {dropped[1]!r}, which are not a merge"):
        export_checkpoint(model, tmp_path / "bad", format="gguf", tokenizer=incomplete)
    assert not (tmp_path / "bad").exists()
