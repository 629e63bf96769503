"""A llama.cpp quantization mix (``QATConfig.gguf_mix``, e.g. "q4_k_m") as one quantizer per weight.

``llama-quantize model-f32.gguf out.gguf Q4_K_M`` gives every tensor a GGML type by a rule
(:mod:`hf_qat.gguf_mix`, which mirrors llama.cpp's ``llama_tensor_get_type``): Q4_K for most,
Q6_K for the output and some ``attn_v`` / ``ffn_down`` layers, llama.cpp's fallback (Q5_0, Q5_1, Q8_0, ...)
for a tensor whose rows are not a multiple of 256 wide, F32 for what it leaves alone. With a mix, hf_qat
asks that rule about the GGUF file its writer would produce for this model, and trains each weight on
the grid of its type, so the GGUF export is, tensor by tensor, the file llama.cpp's quantizer would
write, with QAT codes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import QATModelError
from .bits import TERNARY_BITS
from .gguf_mix import DEFAULT_TYPE, MixModel, mix_tensor_types
from .quantizers.kquants import GRIDS
from .targets import unwrapped_name
from .weights import quantizer_units

# A GGML type -> the family that trains it: (method, bits, group_size).
TYPE_FAMILIES: dict[str, tuple[str, float, int]] = {
    **{grid.ggml_type: (name, grid.bits, grid.block) for name, grid in GRIDS.items()},
    "Q4_0": ("lsq", 4, 32), "Q5_0": ("lsq", 5, 32), "Q8_0": ("lsq", 8, 32),
    "TQ1_0": ("seq", TERNARY_BITS, 256), "TQ2_0": ("seq", TERNARY_BITS, 256), "MXFP4": ("mxfp4", 4, 32),
}
FLOAT_TYPES = ("F32", "F16", "BF16")
# The family each file type names for most weights (QATConfig.method / bits / group_size of its preset).
MIX_BASE = {mix: TYPE_FAMILIES[ggml_type] for mix, ggml_type in DEFAULT_TYPE.items()}


@dataclass(frozen=True)
class WeightFamily:
    """The family one weight trains on: ``ggml_type`` (what the GGUF export writes), ``method``, ``bits``,
    ``group_size``."""

    ggml_type: str
    method: str
    bits: float
    group_size: int


def gguf_tensors(model: nn.Module, names: list[str]) -> tuple[MixModel, list[tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``(MixModel, [(gguf name, ggml shape)], {weight name: gguf name})`` of the tensors the GGUF writer
    writes for ``model``: the weights ``names`` (in that order, the writer's) then every other state-dict
    tensor; ggml shapes list the input dim first."""
    import gguf

    from .export.base import ExportFormatError  # here: hf_qat.export imports hf_qat.convert, which imports this
    from .export.gguf_arch import architecture

    cfg = model.config
    try:
        arch = architecture(cfg)
    except ExportFormatError as exc:
        raise QATModelError(
            f"gguf_mix trains the file llama.cpp's quantizer writes for this model, and hf_qat writes no GGUF of it: "
            f"{exc} Train it without gguf_mix for another format, e.g. QATConfig(bits=4, group_size=32, export_format='compressed-tensors'), which "
            "the native hf-qat format always holds and compressed-tensors (vLLM) holds for most models") from None
    gguf_arch = getattr(gguf.MODEL_ARCH, arch.gguf_arch)
    tensor_names = gguf.get_tensor_name_map(gguf_arch, cfg.num_hidden_layers)
    state = {_transformers_name(key): value for key, value in model.state_dict().items()}  # PEFT: base_layer
    experts = int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0)
    mix_model = MixModel(arch=gguf.MODEL_ARCH_NAMES[gguf_arch], n_layers=cfg.num_hidden_layers,
                         n_head=cfg.num_attention_heads,
                         n_head_kv=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                         n_expert=experts)
    tensors, by_weight = [], {}
    weight_keys = [f"{n}.weight" if f"{n}.weight" in state else n for n in names]
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    for key in weight_keys + [k for k in state if k not in set(weight_keys)]:
        if tied and key == "lm_head.weight" and not arch.output_required:  # the writer leaves it to token_embd
            continue
        for name, shape in _gguf_names(key, tuple(state[key].shape), tensor_names):
            if name not in dict(tensors):
                tensors.append((name, shape))
                by_weight.setdefault(key.removesuffix(".weight"), name)
    return mix_model, tensors, by_weight


def _peft_base(model: nn.Module) -> tuple[nn.Module, str]:
    """``(the transformers model, the prefix of its names in model)``: a PEFT model's base model and
    ``"base_model.model."``; ``(model, "")`` for a plain model."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    prefix = next((f"{name}." for name, module in model.named_modules() if module is base and name), "")
    return base, prefix


def _transformers_name(name: str, prefix: str = "") -> str:
    """A weight's name in the transformers model: without PEFT's prefix and ``.base_layer``."""
    return unwrapped_name(name.removeprefix(prefix))


def _gguf_names(key: str, shape: tuple[int, ...], tensor_names) -> list[tuple[str, tuple[int, ...]]]:
    """The GGUF tensors (name, ggml shape) the writer makes of the state-dict tensor ``key``: a fused expert
    stack ``[E, out, in]`` becomes llama.cpp's stacked ``ffn_{gate,up}_exps`` (the halves of gate_up_proj)
    or ``ffn_down_exps``, ``{in, out, E}``."""
    import gguf

    if ".mlp.experts." in key and len(shape) == 3:
        block = int(key.split(".layers.")[1].split(".")[0])
        experts, out, width = shape

        def name(tensor) -> str:
            return gguf.TENSOR_NAMES[tensor].format(bid=block) + ".weight"

        if key.endswith("gate_up_proj"):
            return [(name(gguf.MODEL_TENSOR.FFN_GATE_EXP), (width, out // 2, experts)),
                    (name(gguf.MODEL_TENSOR.FFN_UP_EXP), (width, out // 2, experts))]
        if key.endswith("down_proj"):
            return [(name(gguf.MODEL_TENSOR.FFN_DOWN_EXP), (width, out, experts))]
    name = tensor_names.get_name(key, try_suffixes=(".weight", ".bias"))
    return [] if name is None else [(name, tuple(reversed(shape)))]


def mix_families(model: nn.Module, names: list[str], mix: str) -> dict[str, WeightFamily | None]:
    """The family of every weight in ``names`` (module names, or ``<experts module>.<parameter>`` for a fused
    expert stack, whose gate and up halves llama.cpp types alike) under the llama.cpp mix ``mix``; None for
    a weight llama.cpp leaves in float. Under PEFT, ``model`` is the PEFT model and ``names`` its names
    (``base_model.model.<name>.base_layer``): the rule types the transformers model inside."""
    model, prefix = _peft_base(model)
    plain = {name: _transformers_name(name, prefix) for name in names}
    mix_model, tensors, by_weight = gguf_tensors(model, list(plain.values()))
    types = mix_tensor_types(mix, mix_model, tensors)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    if tied and types.get("output.weight", types.get("token_embd.weight")) != types.get("token_embd.weight"):
        raise QATModelError(
            f"llama.cpp's {model.config.model_type} file holds the tied LM head as its own output.weight, which "
            f"{mix} stores as {types['output.weight']} while token_embd is {types['token_embd.weight']}: one tied "
            "weight cannot train on both grids. Untie the head (a copy of the embedding: "
            "model.config.tie_word_embeddings = False) or train this model without gguf_mix")
    out: dict[str, WeightFamily | None] = {}
    for name in names:
        gguf_name = by_weight.get(plain[name])
        if gguf_name is None:
            raise QATModelError(f"{name}: no llama.cpp tensor name, so gguf_mix={mix!r} cannot type it")
        ggml_type = types[gguf_name]
        if ggml_type in FLOAT_TYPES:
            out[name] = None
        elif ggml_type in TYPE_FAMILIES:
            out[name] = WeightFamily(ggml_type, *TYPE_FAMILIES[ggml_type])
        else:
            raise QATModelError(f"{name}: llama.cpp's {mix} gives it {ggml_type}, which hf_qat does not train")
    return out


def mean_storage_bits(model: nn.Module) -> float:
    """The GGUF bits per weight of a prepared model's quantized weights, scales included, averaged over their
    weights (what a mix stores: Q4_K 4.5, Q6_K 6.5625, Q5_0 5.5, Q8_0 8.5, ...)."""
    bits = weights = 0.0
    for _, qweight in quantizer_units(model):
        quantizer = qweight.weight_quantizer.quantizer
        per_weight = quantizer.storage_bits() or quantizer.bits + 16.0 / qweight.weight_quantizer.group_size
        bits += per_weight * qweight.weight.numel()
        weights += qweight.weight.numel()
    return bits / weights
