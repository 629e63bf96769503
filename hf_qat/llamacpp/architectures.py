"""The model architectures hf_qat writes to GGUF, and how: llama.cpp's architecture name, metadata,
tensor transforms, and the settings llama.cpp would not reproduce (refused before anything is written).

Each architecture is checked against what llama.cpp's graph for it computes (llama.cpp's
``src/models/<arch>.cpp``):

* llama / mistral (``llama``): q/k rows permuted (llama.cpp rotates interleaved pairs, transformers
  halves); rope "default" or Llama-3.x "llama3" scaling (the per-frequency factors as ``rope_freqs``);
  no sliding window.
* qwen2 / qwen3: rope "default", no sliding window; Qwen3's q/k norms map by name.
* mixtral (``llama`` with experts), qwen3_moe, olmoe: the fused experts are written stacked over the
  experts (``ffn_gate_exps`` / ``ffn_up_exps`` from ``gate_up_proj``'s two halves, ``ffn_down_exps``), the
  router as ``ffn_gate_inp`` in F32, with ``expert_count``, ``expert_used_count`` and
  ``expert_feed_forward_length``; llama.cpp routes by softmax then top-k, and renormalises the top-k
  weights for llama (Mixtral) and qwen3moe, not for olmoe, so ``norm_topk_prob`` must agree; every
  layer must be an MoE block.
* gemma2 / gemma3_text: every RMSNorm computes ``x * (1 + w)`` where llama.cpp multiplies by the stored
  tensor, so norms are written as ``1 + w``; the sqrt(hidden) embedding scale is in llama.cpp's graph;
  sliding-window layers are written as a per-layer pattern; Gemma-2's attention and final logit
  soft-capping, Gemma-3's q/k norms, local rope base and linear rope scaling of the global layers.
  llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden / heads) for the 27B models), so
  ``query_pre_attn_scalar`` must be that; GELU must be the tanh approximation (``gelu_pytorch_tanh``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ExportFormatError

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one transformers model type is written for llama.cpp.

    Attributes:
        gguf_arch: the ``gguf.MODEL_ARCH`` member.
        check: ``check(cfg)`` raises ExportFormatError for a setting llama.cpp would not reproduce.
        metadata: ``metadata(writer, cfg)`` adds the architecture's own keys (rope, windows, caps).
        permute_qk: llama.cpp's llama graph rotates interleaved pairs where transformers rotates
            halves, so q/k rows are reordered (a row permutation: groups along the input stay whole).
        norm_shift: added to every ``*norm.weight`` (1 for Gemma's ``x * (1 + w)`` norms).
        extra_tensors: ``extra_tensors(cfg)`` -> {gguf name: fp32 tensor} written besides the model's.
        tied_head_only: llama.cpp's graph always reads the output from ``token_embd`` (an untied head
            cannot be written).
        output_required: llama.cpp's graph reads ``output.weight`` with no fallback to ``token_embd``
            (a tied head is written as its own copy).
        nvfp4_scales: llama.cpp's graph multiplies the per-tensor ``<name>.scale`` of NVFP4 weights into
            every matmul (its llama, qwen3, qwen3moe graphs do; qwen2's, gemma2/3's dense FFN and olmoe's
            experts do not: NVFP4 is refused there).
    """

    gguf_arch: str
    check: Callable
    metadata: Callable
    permute_qk: bool = False
    norm_shift: float = 0.0
    extra_tensors: Callable = lambda cfg: {}
    tied_head_only: bool = False
    output_required: bool = False
    nvfp4_scales: bool = False


def rope_parameters(cfg) -> dict:
    """transformers 5 keeps rope settings in ``rope_parameters`` (older configs: ``rope_scaling``)."""
    return dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope_theta(rope: dict, cfg) -> float:
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0))


# ---------------------------------------------------------------------------------------- llama, qwen
def _check_rope_and_window(cfg, rope_types: tuple[str, ...]) -> None:
    rope_type = rope_parameters(cfg).get("rope_type", "default")
    if rope_type not in rope_types:
        raise ExportFormatError(
            f"GGUF export of {cfg.model_type} supports the rope types {', '.join(rope_types)}; this model's is "
            f"{rope_type!r} (llama.cpp would compute other positions)."
        )
    window = getattr(cfg, "sliding_window", None)
    if window is not None and (getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings):
        raise ExportFormatError(
            f"this {cfg.model_type} model attends within a sliding window of {window} tokens, which llama.cpp's "
            f"{cfg.model_type} graph does not apply."
        )


def _rope_base_only(writer, cfg) -> None:
    writer.add_rope_freq_base(_rope_theta(rope_parameters(cfg), cfg))


def llama3_rope_factors(cfg) -> torch.Tensor:
    """The per-frequency divisors of Llama-3.x rope scaling (what llama.cpp reads from ``rope_freqs``):
    1 for short wavelengths, ``factor`` for long ones, a smooth blend in between; fp32 ``[head_dim / 2]``."""
    rope = rope_parameters(cfg)
    dim = head_dim(cfg)
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_context = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / _rope_theta(rope, cfg) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * torch.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen < old_context / high, 1.0, torch.where(wavelen > old_context / low, factor, blended))
    return factors.float()


def _llama_rope_freqs(cfg) -> dict[str, torch.Tensor]:
    return {"rope_freqs.weight": llama3_rope_factors(cfg)} if rope_parameters(cfg).get("rope_type") == "llama3" else {}


# ---------------------------------------------------------------------------------------- gemma
def _check_gemma_common(cfg) -> None:
    activation = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    if activation != "gelu_pytorch_tanh":
        raise ExportFormatError(f"llama.cpp's {cfg.model_type} graph uses the tanh GELU; this model's activation is "
                                f"{activation!r}.")
    if getattr(cfg, "attention_bias", False):
        raise ExportFormatError(f"llama.cpp's {cfg.model_type} graph has no attention biases.")
    large = {"gemma2": 46, "gemma3_text": 62}[cfg.model_type] == cfg.num_hidden_layers  # llama.cpp's 27B rule
    expected = cfg.hidden_size // cfg.num_attention_heads if large else head_dim(cfg)
    if getattr(cfg, "query_pre_attn_scalar", expected) != expected:
        raise ExportFormatError(
            f"llama.cpp scales {cfg.model_type} queries by 1/sqrt({expected}) for a model of {cfg.num_hidden_layers} "
            f"layers; this model's query_pre_attn_scalar is {cfg.query_pre_attn_scalar}."
        )
    kinds = sorted(set(_layer_types(cfg)) - set(LAYER_TYPES))
    if kinds:
        raise ExportFormatError(f"GGUF export of {cfg.model_type} knows the layer types {', '.join(LAYER_TYPES)}; "
                                f"this model has {', '.join(kinds)}.")


def _layer_types(cfg) -> list[str]:
    return list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)


def _add_windows(writer, cfg) -> None:
    """The sliding window and which layers use it (llama.cpp reads a per-layer bool array)."""
    writer.add_sliding_window(int(cfg.sliding_window))
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in _layer_types(cfg)])


def _check_gemma2(cfg) -> None:
    _check_gemma_common(cfg)
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, name, None) is None:
            raise ExportFormatError(f"llama.cpp's gemma2 graph always soft-caps the logits; this model's {name} is "
                                    "None.")
    if "sliding_attention" not in _layer_types(cfg):
        raise ExportFormatError("llama.cpp's gemma2 graph needs sliding-window layers (it aborts without any); this "
                                "model's layers are all full attention.")
    _check_layer_ropes(cfg, (rope_parameters(cfg),) * 2, {"default"})


def _gemma2_metadata(writer, cfg) -> None:
    writer.add_rope_freq_base(_rope_theta(rope_parameters(cfg), cfg))
    writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
    writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    _add_windows(writer, cfg)


def _gemma3_rope(cfg) -> tuple[dict, dict]:
    """(global layers' rope, sliding layers' rope): transformers 5 keys Gemma-3's rope by layer type."""
    rope = rope_parameters(cfg)
    if set(rope) <= set(LAYER_TYPES) and rope:
        return dict(rope.get("full_attention", {})), dict(rope.get("sliding_attention", {}))
    return rope, {"rope_theta": getattr(cfg, "rope_local_base_freq", None) or _rope_theta(rope, cfg)}


def _check_layer_ropes(cfg, ropes: tuple[dict, dict], full_types: set[str]) -> None:
    """``ropes``: (global layers' rope, sliding layers' rope); the sliding layers' must be "default"."""
    for kind, rope, allowed in (("global", ropes[0], full_types), ("sliding", ropes[1], {"default"})):
        rope_type = rope.get("rope_type", "default")
        if rope_type not in allowed:
            raise ExportFormatError(
                f"GGUF export of {cfg.model_type} supports the rope types {', '.join(sorted(allowed))} on its {kind} "
                f"layers; this model's is {rope_type!r} (llama.cpp would compute other positions)."
            )


def _check_gemma3(cfg) -> None:
    _check_gemma_common(cfg)
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise ExportFormatError("llama.cpp's gemma3 graph does not soft-cap attention logits; this model's "
                                f"attn_logit_softcapping is {cfg.attn_logit_softcapping}.")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ExportFormatError("llama.cpp's gemma3 graph is causal; this model attends both ways.")
    _check_layer_ropes(cfg, _gemma3_rope(cfg), {"default", "linear"})


def _gemma3_metadata(writer, cfg) -> None:
    import gguf

    full, sliding = _gemma3_rope(cfg)
    writer.add_rope_freq_base(_rope_theta(full, cfg))
    if full.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if "sliding_attention" in _layer_types(cfg):
        writer.add_rope_freq_base_swa(_rope_theta(sliding, cfg))
        _add_windows(writer, cfg)


# ---------------------------------------------------------------------------------------- mixtures of experts
def _check_moe(cfg, renormalised: bool) -> None:
    """Every layer an MoE block, routed as llama.cpp's graph routes: softmax over the experts, the top
    ``num_experts_per_tok``, renormalised to sum 1 or not as that graph does (its ``norm_w``)."""
    if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
        raise ExportFormatError(f"GGUF export of {cfg.model_type} writes models whose every layer is an MoE block; "
                                "this one has dense layers (mlp_only_layers / decoder_sparse_step).")
    norm = getattr(cfg, "norm_topk_prob", True)  # Mixtral always renormalises (no such setting)
    if bool(norm) != renormalised:
        raise ExportFormatError(
            f"llama.cpp's {cfg.model_type} graph {'renormalises' if renormalised else 'does not renormalise'} the "
            f"top-k routing weights; this model's norm_topk_prob is {norm}.")
    if cfg.model_type == "olmoe" and cfg.num_key_value_heads != cfg.num_attention_heads:
        raise ExportFormatError("llama.cpp's olmoe graph normalises keys over the whole hidden size (as many key "
                                f"heads as query heads); this model has {cfg.num_key_value_heads} key/value heads for "
                                f"{cfg.num_attention_heads} query heads.")
    if getattr(cfg, "clip_qkv", None) is not None:
        raise ExportFormatError(f"llama.cpp's {cfg.model_type} graph does not clip q/k/v; this model's clip_qkv is "
                                f"{cfg.clip_qkv}.")


def _moe_metadata(writer, cfg) -> None:
    writer.add_rope_freq_base(_rope_theta(rope_parameters(cfg), cfg))
    writer.add_expert_count(num_experts(cfg))
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_feed_forward_length(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)


def num_experts(cfg) -> int:
    """The experts per MoE layer of ``cfg`` (``<arch>.expert_count``; 0 for a dense model)."""
    return int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0)


def _moe(check_rope: Callable, renormalised: bool) -> Callable:
    def check(cfg) -> None:
        check_rope(cfg)
        _check_moe(cfg, renormalised)
    return check


ARCHITECTURES = {
    "llama": GGUFArchitecture("LLAMA", lambda cfg: _check_rope_and_window(cfg, ("default", "llama3")), _rope_base_only,
                              permute_qk=True, extra_tensors=_llama_rope_freqs, nvfp4_scales=True),
    "mistral": GGUFArchitecture("LLAMA", lambda cfg: _check_rope_and_window(cfg, ("default",)), _rope_base_only,
                                permute_qk=True, nvfp4_scales=True),
    "qwen2": GGUFArchitecture("QWEN2", lambda cfg: _check_rope_and_window(cfg, ("default",)), _rope_base_only),
    "qwen3": GGUFArchitecture("QWEN3", lambda cfg: _check_rope_and_window(cfg, ("default",)), _rope_base_only,
                              nvfp4_scales=True),
    "mixtral": GGUFArchitecture("LLAMA", _moe(lambda cfg: _check_rope_and_window(cfg, ("default",)), True),
                                _moe_metadata, permute_qk=True, nvfp4_scales=True),
    "qwen3_moe": GGUFArchitecture("QWEN3MOE", _moe(lambda cfg: _check_rope_and_window(cfg, ("default",)), True),
                                  _moe_metadata, nvfp4_scales=True),
    "olmoe": GGUFArchitecture("OLMOE", _moe(lambda cfg: _check_rope_and_window(cfg, ("default",)), False),
                              _moe_metadata, output_required=True),
    "gemma2": GGUFArchitecture("GEMMA2", _check_gemma2, _gemma2_metadata, norm_shift=1.0, tied_head_only=True),
    "gemma3_text": GGUFArchitecture("GEMMA3", _check_gemma3, _gemma3_metadata, norm_shift=1.0),
}


def architecture(cfg) -> GGUFArchitecture:
    """The GGUF layout of ``cfg``'s model type; raises ExportFormatError for what llama.cpp would not
    reproduce (another architecture, or a setting its graph for this one does not apply)."""
    model_type = getattr(cfg, "model_type", None)
    if model_type == "gemma3":
        raise ExportFormatError("GGUF export writes Gemma-3's text model (model_type 'gemma3_text', "
                                "Gemma3ForCausalLM); this is the multimodal Gemma-3.")
    if model_type not in ARCHITECTURES:
        raise ExportFormatError(f"GGUF export writes {', '.join(ARCHITECTURES)}; this model is {model_type!r}.")
    arch = ARCHITECTURES[model_type]
    arch.check(cfg)
    if arch.tied_head_only and not getattr(cfg, "tie_word_embeddings", True):
        raise ExportFormatError(f"llama.cpp's {model_type} graph reads the output from the token embedding; this "
                                "model's LM head is untied.")
    return arch


def add_metadata(writer, cfg, arch: GGUFArchitecture) -> None:
    """llama.cpp's ``<arch>.*`` keys (the writer prefixes its architecture): the common ones, then the
    architecture's own."""
    writer.add_name(getattr(cfg, "_name_or_path", None) or "hf_qat export")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    dim = head_dim(cfg)
    writer.add_rope_dimension_count(dim)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_vocab_size(cfg.vocab_size)
    arch.metadata(writer, cfg)
