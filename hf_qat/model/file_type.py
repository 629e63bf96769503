"""A llama.cpp quantization mix (``QATConfig.gguf_mix``, e.g. "q4_k_m") as one quantizer per weight.

``llama-quantize model-f32.gguf out.gguf Q4_K_M`` gives every tensor a GGML type by a rule
(:mod:`hf_qat.llamacpp.file_types`, which mirrors llama.cpp's ``llama_tensor_get_type``): Q4_K for most,
Q6_K for the output and some ``attn_v`` / ``ffn_down`` layers, llama.cpp's fallback (Q5_0, Q5_1, Q8_0, ...)
for a tensor whose rows are not a multiple of 256 wide, F32 for what it leaves alone. With a mix, hf_qat
asks that rule about the GGUF file its writer would produce for this model, and trains each weight on
the grid of its type, so the GGUF export is, tensor by tensor, the file llama.cpp's quantizer would
write, with QAT codes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ExportFormatError, QATModelError
from ..llamacpp.file_types import mix_tensor_types
from ..llamacpp.tensors import gguf_tensors, is_tied
from ..quantizers import family_of_ggml_type
from .targets import unwrapped_name
from .weights import quantizer_units

FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class WeightFamily:
    """The family one weight trains on: ``ggml_type`` (what the GGUF export writes), ``method``, ``bits``,
    ``group_size``."""

    ggml_type: str
    method: str
    bits: float
    group_size: int


def _gguf_tensors(model: nn.Module, names: list[str]):
    """:func:`~hf_qat.llamacpp.tensors.gguf_tensors` of the transformers ``model`` (PEFT's ``.base_layer``
    dropped from its names), a model GGUF cannot hold refused with the advice to train without gguf_mix."""
    state = {_transformers_name(key): value for key, value in model.state_dict().items()}
    try:
        return gguf_tensors(model, names, state)
    except ExportFormatError as exc:
        raise QATModelError(
            f"gguf_mix trains the file llama.cpp's quantizer writes for this model, and hf_qat writes no GGUF of it: "
            f"{exc} Train it without gguf_mix for another format, e.g. QATConfig(bits=4, group_size=32, export_format='compressed-tensors'), which "
            "the native hf-qat format always holds and compressed-tensors (vLLM) holds for most models") from None


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


def mix_families(model: nn.Module, names: list[str], mix: str) -> dict[str, WeightFamily | None]:
    """The family of every weight in ``names`` (module names, or ``<experts module>.<parameter>`` for a fused
    expert stack, whose gate and up halves llama.cpp types alike) under the llama.cpp mix ``mix``; None for
    a weight llama.cpp leaves in float. Under PEFT, ``model`` is the PEFT model and ``names`` its names
    (``base_model.model.<name>.base_layer``): the rule types the transformers model inside."""
    model, prefix = _peft_base(model)
    plain = {name: _transformers_name(name, prefix) for name in names}
    mix_model, tensors, by_weight = _gguf_tensors(model, list(plain.values()))
    types = mix_tensor_types(mix, mix_model, tensors)
    if is_tied(model) and types.get("output.weight", types.get("token_embd.weight")) != types.get("token_embd.weight"):
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
        elif (family := family_of_ggml_type(ggml_type)) is not None:
            out[name] = WeightFamily(ggml_type, *family)
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
