"""The GGML type llama.cpp's own quantizer (``llama-quantize``, ``llama_model_quantize``) gives each tensor
of a model for the k-quant mixes Q4_K_M, Q4_K_S, Q5_K_M and Q6_K.

A port of llama.cpp's ``src/llama-quant.cpp`` (as vendored by llama-cpp-python 0.3.36):
``llama_tensor_get_type`` (which calls ``tensor_allows_quantization``, ``llama_tensor_get_type_impl``
and ``tensor_type_fallback``), ``llama_ftype_get_default_type``, ``tensor_get_category`` and
``init_quantize_state_counters``, restricted to the branches these four mixes reach for the
architectures hf_qat writes (llama incl. Mixtral, qwen2, qwen3, gemma2, gemma3, qwen3moe, olmoe), with
the quantizer's default parameters (no imatrix, no overrides, output tensor quantized).

The rule, in words:

* Order: llama.cpp visits the tensors sorted by layer (``blk.<i>.``; other tensors first, as layer -1),
  then by name (``weight_name_comparer``); the per-layer counters below follow that order.
* Not quantized (keeps its input type, F32 here): tensors with fewer than 2 dimensions (norms,
  biases, ``rope_freqs``), names not ending in ``weight``, ``*_norm.weight``, MoE routers
  (``ffn_gate_inp.weight``).
* Default type: the mix's base type (Q4_K for q4_k_m / q4_k_s, Q5_K for q5_k_m, Q6_K for q6_k).
* Output (``output.weight``, or ``token_embd.weight`` when there is no ``output.weight``: tied
  embeddings): Q6_K, or Q8_0 when its row length is not a multiple of 256.
* ``token_embd.weight`` with an ``output.weight``: the default type.
* attn_v-like (``attn_v``, ``attn_qkv``, ``attn_kv_b``), counted in visit order ``i`` of ``n`` such
  tensors: q4_k_m / q5_k_m: Q6_K where ``use_more_bits(i, n)``; q4_k_s: Q5_K for the first 4. Then a
  70B model (llama: 80 layers and GQA, not 8 experts; qwen2: 80 layers) lifts Q4_K to Q5_K; an
  8-expert model (Mixtral) takes Q8_0 whatever the mix.
* attn_k: Q8_0 for an 8-expert model.
* attn_output: Q5_K for an 8-expert model under q4_k_m / q4_k_s.
* ffn_down (``ffn_down``, ``ffn_down_exps``, ...), at layer ``i`` of ``n`` (for MoE models, ``n_expert >
  1``, the layer in the name; for dense ones, the count of ffn_down tensors visited before; ``n`` the
  block count): q4_k_m / q5_k_m: Q6_K where ``use_more_bits(i, n)``; q4_k_s: Q5_K for ``i < n // 8``.
* ``use_more_bits(i, n) = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2``.
* Fallback (``tensor_type_fallback``): a row length (``ne[0]``, the input dim) not a multiple of the
  type's block (256 for k-quants, 32 for Q5_0 / Q5_1 / Q8_0) demotes Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0 (Q8_0 stays), and to F16 when the row length is not a multiple of 32 either.

``attn_qkv`` never reaches llama.cpp's own attn_qkv branch (Q5_K / Q6_K for q4_k_m / q5_k_m): the
attn_v-like branch before it takes it, and so does this port.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import QATConfigError

MIXES: tuple[str, ...] = ("q4_k_m", "q4_k_s", "q5_k_m", "q6_k")
DEFAULT_TYPE = {"q4_k_m": "Q4_K", "q4_k_s": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}  # llama_ftype_get_default_type
BLOCK = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "F16": 1}  # ggml_blck_size
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # tensor_type_fallback, for the types reached here
_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")  # sscanf(name, "blk.%d.", ...)


@dataclass(frozen=True)
class MixModel:
    """The model hyperparameters llama.cpp's quantizer reads (as llama.cpp loads them from the GGUF).

    Attributes:
        arch: the GGUF architecture name (``general.architecture``: "llama", "qwen2", "qwen3", "gemma2",
            "gemma3", "qwen3moe", "olmoe").
        n_layers: the block count (``<arch>.block_count``).
        n_head: attention heads (``<arch>.attention.head_count``).
        n_head_kv: key/value heads (``<arch>.attention.head_count_kv``).
        n_expert: experts per MoE layer (``<arch>.expert_count``), 0 for a dense model.
    """

    arch: str
    n_layers: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's ``LLM_TYPE_70B`` (the only model size the quantizer reads), from the arch's
        ``load_arch_hparams``: an 80-layer llama with GQA and not 8 experts, or an 80-layer qwen2."""
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_layers == 80 and self.n_head != self.n_head_kv
        return self.arch == "qwen2" and self.n_layers == 80


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layers that get more bits: the first and last eighth, and every third in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def visit_order(names: list[str]) -> list[str]:
    """``names`` in the order llama.cpp's quantizer visits them (``weight_name_comparer``): by the layer
    number after ``blk.`` (-1 for other tensors), then by name (bytewise)."""
    def key(name: str) -> tuple[int, bytes]:
        match = _LAYER.match(name)
        return (int(match.group(1)) if match else -1, name.encode())

    return sorted(names, key=key)


def category(name: str) -> str:
    """llama.cpp's ``tensor_get_category`` of a tensor name: "output", "token_embd", "attn_qkv",
    "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output", "ffn_up", "ffn_gate", "ffn_down" or
    "other" (substring tests, in this order)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for cat in ("attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{cat}.weight" in name:
            return cat
    for cat in ("ffn_up", "ffn_gate", "ffn_down"):
        if cat in name:
            return cat
    return "other"


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` for these architectures: 2-D or 3-D (``ggml_n_dims``:
    trailing dims of 1 do not count) weights, not norms, not MoE routers."""
    n_dims = max((i + 1 for i, n in enumerate(shape) if n > 1), default=1)
    return (n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def fallback(qtype: str, row: int) -> str:
    """llama.cpp's ``tensor_type_fallback``: ``qtype``, or what replaces it when the row length ``row``
    (elements, ``ne[0]``) is not a multiple of its block."""
    if row % BLOCK[qtype] == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if row % BLOCK[qtype] == 0 else "F16"


def mix_tensor_types(mix: str, model: MixModel, tensors: list[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    """The GGML type (``GGMLQuantizationType`` name: "Q4_K", "Q6_K", "Q5_0", "Q8_0", "F16", "F32", ...)
    llama.cpp's quantizer writes for each tensor of an all-F32 GGUF file under the k-quant ``mix``.

    Args:
        mix: one of MIXES (llama.cpp's ``LLAMA_FTYPE_MOSTLY_Q4_K_M`` etc.).
        model: the hyperparameters llama.cpp reads.
        tensors: every tensor of the file as (GGUF name, shape in ggml order ``ne``: ``ne[0]`` the row
            length, i.e. the input dim, then rows, then experts). Any order: they are visited as
            llama.cpp visits them (:func:`visit_order`).

    Returns:
        {name: type name}; tensors llama.cpp does not quantize keep "F32".
    """
    if mix not in MIXES:
        raise QATConfigError("gguf_mix", mix, ", ".join(MIXES))
    shapes = dict(tensors)
    names = visit_order(list(shapes))
    default = DEFAULT_TYPE[mix]
    tied = "output.weight" not in shapes  # llama.cpp's has_tied_embeddings
    n_attention_wv = sum(category(name) in ("attn_v", "attn_qkv", "attn_kv_b") for name in names)
    i_attention_wv = i_ffn_down = 0
    types = {}
    for name in names:
        shape = shapes[name]
        if not allows_quantization(name, shape):
            types[name] = "F32"
            continue
        cat, qtype = category(name), default
        if cat == "output" or (tied and cat == "token_embd"):
            qtype = "Q8_0" if shape[0] % BLOCK[default] else "Q6_K"
        elif cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i_attention_wv, n_attention_wv):
                qtype = "Q6_K"
            elif mix == "q4_k_s" and i_attention_wv < 4:
                qtype = "Q5_K"
            if model.is_70b and qtype == "Q4_K":
                qtype = "Q5_K"
            if model.n_expert == 8:
                qtype = "Q8_0"
            i_attention_wv += 1
        elif cat == "attn_k":
            if model.n_expert == 8:
                qtype = "Q8_0"
        elif cat == "ffn_down":
            i_layer = _layer_of(name, model) if model.n_expert > 1 else i_ffn_down
            if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, model.n_layers):
                qtype = "Q6_K"
            elif mix == "q4_k_s" and i_layer < model.n_layers // 8:
                qtype = "Q5_K"
            i_ffn_down += 1
        elif cat == "attn_output":
            if model.n_expert == 8 and mix in ("q4_k_m", "q4_k_s"):
                qtype = "Q5_K"
        types[name] = fallback(qtype, shape[0])
    return types


def _layer_of(name: str, model: MixModel) -> int:
    """The layer of an MoE model's tensor, from its name (llama.cpp's ``layer_info``: MoE expert
    tensors are not one per layer, so no counter)."""
    match = _LAYER.match(name)
    if match is None or not 0 <= int(match.group(1)) < model.n_layers:
        raise ValueError(f"{name}: no layer in [0, {model.n_layers}) (llama.cpp's quantizer fails on it)")
    return int(match.group(1))
