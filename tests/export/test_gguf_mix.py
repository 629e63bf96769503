"""hf_qat.llamacpp.file_types predicts the tensor types llama.cpp's own quantizer (``llama_model_quantize``,
through tests/llama_runtime.py) writes for the k-quant mixes: tiny all-F32 GGUF files, quantized by llama.cpp under
each mix, every tensor's type compared with the prediction.

The models reach every branch the port has: (a) a 16-layer GQA llama with an output tensor (attn_v /
ffn_down "more bits" layers, q4_k_s's first layers); (b) the same tied (token_embd takes the output's
Q6_K); (c) hidden 320, intermediate 400 (rows not a multiple of 256: Q5_0 / Q5_1 / Q8_0 fallbacks;
ffn_down's 400 not a multiple of 32: F16; output Q8_0); (d) a qwen3moe with 8 experts (the 8-expert
Q8_0 attn_v / attn_k and Q5_K attn_output, ffn_down layers read from the names, routers and q/k norms
F32, 128-wide expert rows falling back); (e) an olmoe with 4 experts (an MoE
under the dense attn_v / attn_output rules); (f) an 80-layer GQA llama, which llama.cpp types as 70B (attn_v
Q4_K lifted to Q5_K), kept small by narrow heads and FFN.
"""

from __future__ import annotations

import numpy as np
import pytest

from hf_qat.errors import QATConfigError
from hf_qat.llamacpp.file_types import MIXES, MixModel, mix_tensor_types
import llama_runtime

FTYPES = {mix: f"LLAMA_FTYPE_MOSTLY_{mix.upper()}" for mix in MIXES}
# name -> GGUF writer settings: arch, layers, hidden, FFN width (per expert), heads, kv heads, head dim, experts
MODELS = {
    "llama": dict(arch="llama", layers=16, hidden=256, ff=512, heads=8, kv=2),
    "llama-tied": dict(arch="llama", layers=16, hidden=256, ff=512, heads=8, kv=2, tied=True),
    "llama-320": dict(arch="llama", layers=16, hidden=320, ff=400, heads=8, kv=2),
    "qwen3moe": dict(arch="qwen3moe", layers=8, hidden=256, ff=128, heads=8, kv=2, head_dim=32, experts=8),
    "olmoe": dict(arch="olmoe", layers=8, hidden=256, ff=256, heads=8, kv=8, experts=4),
    "llama-70b": dict(arch="llama", layers=80, hidden=256, ff=32, heads=8, kv=2, head_dim=8),
}


def write_f32_gguf(path, arch: str, layers: int, hidden: int, ff: int, heads: int, kv: int, head_dim: int = 0,
                   experts: int = 0, tied: bool = False, vocab: int = 320) -> None:
    """A GGUF file llama.cpp's quantizer loads: its hparams metadata (no tokenizer: the quantizer does not
    read one) and every tensor in F32 (random), named and shaped as llama.cpp's ``arch`` graph loads them."""
    import gguf

    head_dim = head_dim or hidden // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(vocab)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(2)
        writer.add_expert_feed_forward_length(ff)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:  # shape in numpy (torch) order: gguf stores it reversed (ne)
        writer.add_tensor(name, rng.standard_normal(shape, dtype=np.float32))

    add("token_embd.weight", vocab, hidden)
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", hidden)
        add(p + "attn_q.weight", heads * head_dim, hidden)
        add(p + "attn_k.weight", kv * head_dim, hidden)
        add(p + "attn_v.weight", kv * head_dim, hidden)
        add(p + "attn_output.weight", hidden, heads * head_dim)
        add(p + "ffn_norm.weight", hidden)
        if experts:
            add(p + "attn_q_norm.weight", head_dim)
            add(p + "attn_k_norm.weight", head_dim)
            add(p + "ffn_gate_inp.weight", experts, hidden)
            add(p + "ffn_gate_exps.weight", experts, ff, hidden)
            add(p + "ffn_up_exps.weight", experts, ff, hidden)
            add(p + "ffn_down_exps.weight", experts, hidden, ff)
        else:
            add(p + "ffn_gate.weight", ff, hidden)
            add(p + "ffn_up.weight", ff, hidden)
            add(p + "ffn_down.weight", hidden, ff)
    add("output_norm.weight", hidden)
    if not tied:
        add("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def mix_model_of(reader) -> MixModel:
    """The hparams llama.cpp's quantizer reads, from a GGUF file's metadata (gguf.GGUFReader)."""
    arch = reader.fields["general.architecture"].contents()

    def key(name: str, default=None):
        field = reader.fields.get(f"{arch}.{name}")
        return default if field is None else field.contents()

    return MixModel(arch=arch, n_layers=key("block_count"), n_head=key("attention.head_count"),
                    n_head_kv=key("attention.head_count_kv"), n_expert=key("expert_count", 0))


@pytest.mark.parametrize("case", sorted(MODELS))
def test_mix_tensor_types_are_llama_cpps(case, tmp_path):
    llama_runtime.runtime()
    import gguf

    f32 = tmp_path / "f32.gguf"
    write_f32_gguf(f32, **MODELS[case])
    reader = gguf.GGUFReader(str(f32))
    model = mix_model_of(reader)
    tensors = [(t.name, tuple(int(n) for n in t.shape)) for t in reader.tensors]  # file order, ne order
    seen = set()
    for mix in MIXES:
        out = tmp_path / f"{mix}.gguf"
        if llama_runtime.quantize(f32, out, FTYPES[mix], nthread=2) != 0:  # llama.cpp stops: so must the port
            with pytest.raises(QATConfigError, match=r"defines no type for Q1_0 to fall back to"):
                mix_tensor_types(mix, model, tensors)
            seen.add(f"{mix} refused")
            continue
        got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
        want = mix_tensor_types(mix, model, tensors)
        wrong = {name: (want.get(name), got.get(name)) for name in got.keys() | want.keys()
                 if want.get(name) != got.get(name)}
        assert not wrong, f"{case} {mix}: (predicted, llama.cpp) {sorted(wrong.items())}"
        assert mix_tensor_types(mix, model, tensors[::-1]) == want  # llama.cpp's visit order, not the file's
        seen |= set(got.values())
    print(f"{case}: types {sorted(seen)}")


def test_mix_tensor_types_spot_checks():
    """Spot checks of the rule that need no llama.cpp (the comparison above is the real test)."""
    model = MixModel(arch="llama", n_layers=16, n_head=8, n_head_kv=2)
    tensors = [("token_embd.weight", (256, 320)), ("output_norm.weight", (256,))]
    for i in range(16):
        tensors += [(f"blk.{i}.attn_v.weight", (256, 64)), (f"blk.{i}.ffn_down.weight", (512, 256)),
                    (f"blk.{i}.ffn_norm.weight", (256,))]
    types = mix_tensor_types("q4_k_m", model, tensors)
    assert types["token_embd.weight"] == "Q6_K"  # tied: the output's type
    assert types["output_norm.weight"] == "F32"
    more_bits = [i for i in range(16) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert more_bits == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(16) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == more_bits
    types = mix_tensor_types("q4_k_s", model, tensors + [("output.weight", (256, 320))])
    assert types["token_embd.weight"] == "Q4_K" and types["output.weight"] == "Q6_K"
    assert [types[f"blk.{i}.attn_v.weight"] for i in (3, 4)] == ["Q5_K", "Q4_K"]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in (1, 2)] == ["Q5_K", "Q4_K"]


def test_unknown_mix_is_refused():
    with pytest.raises(QATConfigError) as err:
        mix_tensor_types("q4_k_l", MixModel(arch="llama", n_layers=2, n_head=4, n_head_kv=4), [])
    assert (err.value.field, err.value.value) == ("gguf_mix", "q4_k_l")
    assert err.value.allowed.split(", ") == list(MIXES) and {"q4_0", "q3_k_m", "iq4_xs", "tq1_0"} <= set(MIXES)
