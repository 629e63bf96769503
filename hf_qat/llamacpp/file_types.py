"""The GGML type llama.cpp's own quantizer (``llama-quantize``, ``llama_model_quantize``) gives each tensor
of a model for each llama.cpp file type with a scalar grid (:data:`DEFAULT_TYPE`: Q4_0 .. Q8_0, the k-quant
files Q2_K .. Q6_K, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, Q1_0, MXFP4_MOE).

A port of llama.cpp's ``src/llama-quant.cpp`` (as vendored by llama-cpp-python 0.3.36):
``llama_tensor_get_type`` (which calls ``tensor_allows_quantization``, ``llama_tensor_get_type_impl``
and ``tensor_type_fallback``), ``llama_ftype_get_default_type``, ``tensor_get_category`` and
``init_quantize_state_counters``, restricted to the branches these file types reach for the architectures
hf_qat writes (llama incl. Mixtral, qwen2, qwen3, gemma2, gemma3, qwen3moe, olmoe), with the quantizer's
default parameters (no imatrix, no overrides, output tensor quantized).

The rule, in words (``gqa`` = query heads / key-value heads):

* Order: llama.cpp visits the tensors sorted by layer (``blk.<i>.``; other tensors first, as layer -1),
  then by name (``weight_name_comparer``); the per-layer counters below follow that order.
* Not quantized (keeps its input type, F32 here): tensors with fewer than 2 dimensions (norms,
  biases, ``rope_freqs``), names not ending in ``weight``, ``*_norm.weight``, MoE routers
  (``ffn_gate_inp.weight``).
* Default type: the file type's base type (:data:`DEFAULT_TYPE`).
* Output (``output.weight``, or ``token_embd.weight`` when there is no ``output.weight``: tied
  embeddings): Q8_0 for mxfp4_moe or when its row length is not a multiple of the base type's block,
  else Q6_K (Q8_0 stays Q8_0).
* mxfp4_moe: expert stacks (3-D) MXFP4, every other tensor Q8_0.
* ``token_embd.weight`` with an ``output.weight``: the base type; Q4_K for tq1_0 / tq2_0.
* attn_v-like (``attn_v``, ``attn_qkv``, ``attn_kv_b``), counted in visit order ``i`` of ``n`` such
  tensors: q2_k Q4_K when gqa >= 4 else Q3_K; q3_k_m Q5_K for the first two, else Q4_K; q3_k_l Q5_K;
  iq4_nl / iq4_xs Q5_K when gqa >= 4; q4_k_m / q5_k_m Q6_K where ``use_more_bits(i, n)``; q4_k_s Q5_K for
  the first 4. Then a 70B model (llama: 80 layers and GQA, not 8 experts; qwen2: 80 layers) lifts Q3_K /
  Q4_K to Q5_K; an 8-expert model (Mixtral) takes Q8_0 whatever the file type.
* attn_k: Q8_0 for an 8-expert model.
* ffn_down (``ffn_down``, ``ffn_down_exps``, ...), at layer ``i`` of ``n`` (for MoE models, ``n_expert >
  1``, the layer in the name; for dense ones, the count of ffn_down tensors visited before; ``n`` the
  block count): q2_k Q3_K; q3_k_m Q5_K for ``i < n // 16``, else Q4_K; q3_k_l Q5_K; q4_k_m / q5_k_m Q6_K
  where ``use_more_bits(i, n)``; iq4_nl / iq4_xs and q4_k_s Q5_K for ``i < n // 8``.
* attn_output: an 8-expert model takes Q5_K under q2_k, q3_k_s, q3_k_m, iq4_nl, q4_k_s, q4_k_m, iq4_xs;
  otherwise q2_k Q3_K, q3_k_m Q4_K, q3_k_l Q5_K.
* ``use_more_bits(i, n) = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2``.
* Fallback (``tensor_type_fallback``): a row length (``ne[0]``, the input dim) not a multiple of the
  type's block (256 for the k-quants, IQ4_XS and TQ, 32 for the others) demotes IQ4_XS -> IQ4_NL,
  Q2_K / Q3_K / TQ1_0 / TQ2_0 -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (a 32-block type stays),
  and to F16 when the row length is not a multiple of 32 either. Q1_0 (blocks of 128) has no fallback:
  llama.cpp's quantizer stops on such a tensor, and so does this port (:class:`NoFallback`).

``attn_qkv`` never reaches llama.cpp's own attn_qkv branch: the attn_v-like branch before it takes it,
and so does this port. The file types llama.cpp writes that hf_qat cannot train are :data:`UNTRAINABLE`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import QATConfigError

# llama_ftype_get_default_type, for the file types whose every type hf_qat trains (lower case, as the presets)
DEFAULT_TYPE = {
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0",
    "q2_k": "Q2_K", "q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K",
    "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K",
    "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS", "tq1_0": "TQ1_0", "tq2_0": "TQ2_0", "q1_0": "Q1_0", "mxfp4_moe": "MXFP4",
}
MIXES: tuple[str, ...] = tuple(DEFAULT_TYPE)
# llama.cpp file types hf_qat cannot train, and why (QATConfig.gguf_mix refuses them by name)
UNTRAINABLE = {
    **{t: "its IQ1 / IQ2 / IQ3 types pick each group of weights from a codebook of lattice vectors, which hf_qat "
          "has no straight-through grid for"
       for t in ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m")},
    "q2_0": "gguf-py (0.19.0, the newest on PyPI) has no Q2_0 type, so hf_qat can neither write nor read its "
            "blocks",
    "q2_k_s": "llama.cpp's quantizer writes it only with an importance matrix, and hf_qat's port of its rule "
              "follows the quantizer without one",
    "nvfp4": "the vendored llama.cpp's quantizer has no default type for it (it writes no NVFP4 file); train "
             "QATConfig.from_preset('nvfp4') and export it to GGUF instead",
}
BLOCK = {"Q1_0": 128, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "IQ4_NL": 32, "MXFP4": 32, "NVFP4": 64, "F16": 1,
         **{t: 256 for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "TQ1_0", "TQ2_0")}}  # ggml_blck_size
FALLBACK = {"IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0",
            "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # tensor_type_fallback, for the types reached here
def file_type_of(ggml_type: str) -> str | None:
    """The llama.cpp file type whose base type is ``ggml_type`` (the ``_m`` one when there are several), or
    None: what a user who trained that grid everywhere would pick."""
    file_types = [file_type for file_type, base in DEFAULT_TYPE.items() if base == ggml_type]
    return next((ft for ft in file_types if ft.endswith("_m")), file_types[0] if file_types else None)


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


class NoFallback(ValueError):
    """A tensor's row length is not a multiple of its type's block and llama.cpp defines no type to fall back
    to: its quantizer stops on the model (``no tensor type fallback is defined for type ...``)."""


def fallback(qtype: str, row: int) -> str:
    """llama.cpp's ``tensor_type_fallback``: ``qtype``, or what replaces it when the row length ``row``
    (elements, ``ne[0]``) is not a multiple of its block; raises :class:`NoFallback` where llama.cpp stops."""
    if row % BLOCK[qtype] == 0:
        return qtype
    if qtype not in FALLBACK and BLOCK[qtype] > 32:
        raise NoFallback(f"rows of {row} weights are not a multiple of {qtype}'s block of {BLOCK[qtype]}, and "
                         f"llama.cpp defines no type for {qtype} to fall back to (its quantizer stops on this model)")
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if row % BLOCK[qtype] == 0 else "F16"


def mix_tensor_types(mix: str, model: MixModel, tensors: list[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    """The GGML type (``GGMLQuantizationType`` name: "Q4_K", "Q6_K", "Q5_0", "Q8_0", "F16", "F32", ...)
    llama.cpp's quantizer writes for each tensor of an all-F32 GGUF file under the file type ``mix``.

    Args:
        mix: one of MIXES (llama.cpp's ``LLAMA_FTYPE_MOSTLY_<MIX>``, e.g. Q4_K_M).
        model: the hyperparameters llama.cpp reads.
        tensors: every tensor of the file as (GGUF name, shape in ggml order ``ne``: ``ne[0]`` the row
            length, i.e. the input dim, then rows, then experts). Any order: they are visited as
            llama.cpp visits them (:func:`visit_order`).

    Returns:
        {name: type name}; tensors llama.cpp does not quantize keep "F32".
    """
    if mix not in MIXES:
        raise QATConfigError("gguf_mix", mix, ", ".join(MIXES))
    try:
        return _tensor_types(mix, model, tensors)
    except NoFallback as error:
        writable = [other for other in MIXES if other != mix and _writes(other, model, tensors)]
        raise QATConfigError("gguf_mix", mix, ", ".join(writable), str(error)) from None


def _writes(mix: str, model: MixModel, tensors: list[tuple[str, tuple[int, ...]]]) -> bool:
    """Whether llama.cpp's quantizer writes the file type ``mix`` of this model (no tensor without a fallback)."""
    try:
        _tensor_types(mix, model, tensors)
    except NoFallback:
        return False
    return True


def _tensor_types(mix: str, model: MixModel, tensors: list[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    """:func:`mix_tensor_types`' rule; raises :class:`NoFallback` where llama.cpp's quantizer stops."""
    shapes = dict(tensors)
    names = visit_order(list(shapes))
    tied = "output.weight" not in shapes  # llama.cpp's has_tied_embeddings
    n_attention_wv = sum(category(name) in ATTN_V for name in names)
    counters = {"attn_v": 0, "ffn_down": 0}
    types = {}
    for name in names:
        shape = shapes[name]
        if not allows_quantization(name, shape):
            types[name] = "F32"
            continue
        try:
            types[name] = fallback(_impl_type(mix, model, name, shape, tied, counters, n_attention_wv), shape[0])
        except NoFallback as error:
            raise NoFallback(f"{name}: {error}") from None
    return types


ATTN_V = ("attn_v", "attn_qkv", "attn_kv_b")  # category_is_attn_v


def _impl_type(mix: str, model: MixModel, name: str, shape: tuple[int, ...], tied: bool, counters: dict[str, int],
               n_attention_wv: int) -> str:
    """``llama_tensor_get_type_impl`` for the file type ``mix`` (no imatrix, default parameters), before the
    fallback; ``counters`` are its per-category visit counters (updated)."""
    cat, qtype = category(name), DEFAULT_TYPE[mix]
    gqa = model.n_head // model.n_head_kv
    if cat == "output" or (tied and cat == "token_embd"):
        if mix == "mxfp4_moe" or shape[0] % BLOCK[qtype]:
            return "Q8_0"
        return qtype if qtype == "Q8_0" else "Q6_K"
    if mix == "mxfp4_moe":  # experts MXFP4, the rest Q8_0
        return "MXFP4" if len(shape) > 2 and shape[2] > 1 else "Q8_0"
    if cat == "token_embd":
        return "Q4_K" if mix in ("tq1_0", "tq2_0") else qtype
    if cat in ATTN_V:
        i = counters["attn_v"]
        counters["attn_v"] += 1
        if mix == "q2_k":
            qtype = "Q4_K" if gqa >= 4 else "Q3_K"
        elif mix == "q3_k_m":
            qtype = "Q5_K" if i < 2 else "Q4_K"
        elif mix == "q3_k_l":
            qtype = "Q5_K"
        elif mix in ("iq4_nl", "iq4_xs") and gqa >= 4:
            qtype = "Q5_K"
        elif mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_attention_wv):
            qtype = "Q6_K"
        elif mix == "q4_k_s" and i < 4:
            qtype = "Q5_K"
        if model.is_70b and qtype in ("Q3_K", "Q4_K"):
            qtype = "Q5_K"
        return "Q8_0" if model.n_expert == 8 else qtype
    if cat == "attn_k":
        return "Q8_0" if model.n_expert == 8 else qtype
    if cat == "ffn_down":
        i = _layer_of(name, model) if model.n_expert > 1 else counters["ffn_down"]
        counters["ffn_down"] += 1
        n = model.n_layers
        if mix == "q2_k":
            return "Q3_K"
        if mix == "q3_k_m":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if mix == "q3_k_l":
            return "Q5_K"
        if mix == "q4_k_m":
            return "Q6_K" if use_more_bits(i, n) else qtype
        if i < n // 8 and mix in ("iq4_nl", "iq4_xs"):
            return "Q5_K"
        if mix == "q5_k_m" and use_more_bits(i, n):
            return "Q6_K"
        if mix == "q4_k_s" and i < n // 8:
            return "Q5_K"
        return qtype
    if cat == "attn_output":
        if model.n_expert == 8:
            eight = ("q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq4_xs")
            return "Q5_K" if mix in eight else qtype
        return {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(mix, qtype)
    return qtype


def _layer_of(name: str, model: MixModel) -> int:
    """The layer of an MoE model's tensor, from its name (llama.cpp's ``layer_info``: MoE expert
    tensors are not one per layer, so no counter)."""
    match = _LAYER.match(name)
    if match is None or not 0 <= int(match.group(1)) < model.n_layers:
        raise ValueError(f"{name}: no layer in [0, {model.n_layers}) (llama.cpp's quantizer fails on it)")
    return int(match.group(1))
