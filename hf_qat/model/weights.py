"""The quantized weights of a prepared model: each one's module, parameter and unit.

A QAT model computes with three kinds of modules that hold units: QATLinear and QATEmbedding (one
``weight`` each) and QAT fused experts (one unit per fused 3-D weight, :mod:`hf_qat.model.experts`). Callers
that act on weights (initialise scales, bake, export, count) iterate :func:`quantized_weights` and see
one :class:`QuantizedWeight` per weight, whatever module holds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QATModelError
from .distributed import full_tensor
from .experts import UNIT_SUFFIX, QATExperts
from .modules import QAT_MODULE_TYPES, QATEmbedding
from .unit import WeightQuantizer


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight.

    Attributes:
        name: the weight's name: the module's name for a Linear or Embedding
            ("model.layers.0.self_attn.q_proj"), ``<experts module>.<parameter>`` for a fused expert
            weight ("model.layers.0.mlp.experts.gate_up_proj").
        module_name: the name of the module that holds it.
        module: that module (QATLinear, QATEmbedding or QAT experts).
        parameter: the Parameter's name in the module ("weight", "gate_up_proj").
        kind: "linear", "embedding" or "experts".
        weight_quantizer: its unit (a tied LM head shares the embedding's).
    """

    name: str
    module_name: str
    module: nn.Module
    parameter: str
    kind: str
    weight_quantizer: WeightQuantizer

    @property
    def weight(self) -> nn.Parameter:
        return self.module._parameters[self.parameter]

    @property
    def is_qat_active(self) -> bool:
        return self.weight_quantizer.is_active

    @property
    def unit_prefix(self) -> str:
        """The state-dict prefix of its unit's tensors (``<module>.<parameter>_quantizer.``)."""
        return f"{self.module_name}.{self.parameter}{UNIT_SUFFIX}."

    def full_weight(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """The whole weight in its stored layout (all-gathered under FSDP2), plus an optional LoRA delta."""
        weight = full_tensor(self.weight)
        return weight if delta is None else weight + full_tensor(delta)


def qat_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module that holds QAT units, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, (*QAT_MODULE_TYPES, QATExperts)):
            yield name, module


def require_qat_modules(model: nn.Module, caller: str) -> None:
    """QATModelError unless ``model`` holds QAT modules: ``caller`` (a function that works on them) would do
    nothing and say nothing on a model nobody prepared."""
    if next(qat_modules(model), None) is None:
        raise QATModelError(f"{caller}: the model has no QAT modules; prepare it first with "
                            "hf_qat.prepare_model_for_qat(model, config) (QATCallback does it in the Trainer)")


def quantized_weights(model: nn.Module) -> Iterator[tuple[str, QuantizedWeight]]:
    """``(weight name, QuantizedWeight)`` for every quantized weight, in module order (a tied LM head
    is listed with the embedding's unit)."""
    for module_name, module in qat_modules(model):
        if isinstance(module, QATExperts):
            for parameter, unit in module.weight_quantizers().items():
                name = f"{module_name}.{parameter}"
                yield name, QuantizedWeight(name, module_name, module, parameter, "experts", unit)
        else:
            kind = "embedding" if isinstance(module, QATEmbedding) else "linear"
            yield module_name, QuantizedWeight(module_name, module_name, module, "weight", kind, module.weight_quantizer)


def quantizer_units(model: nn.Module) -> Iterator[tuple[str, QuantizedWeight]]:
    """:func:`quantized_weights` with each distinct unit once (a tied head, which shares its
    embedding's unit and weight, is skipped)."""
    seen: set[int] = set()
    for name, weight in quantized_weights(model):
        if id(weight.weight_quantizer) not in seen:
            seen.add(id(weight.weight_quantizer))
            yield name, weight


def get_qat_config(model: nn.Module):
    """The QATConfig a model was prepared with (None if it was not)."""
    for _, weight in quantized_weights(model):
        return weight.weight_quantizer.config
    return None
