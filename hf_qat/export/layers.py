"""What every export starts from: the integer codes and steps of each quantized layer, and the rest.

Export is packing, never re-quantization (DESIGN.md rule 4): the codes are the ones the QAT forward
pass used (``quantize_codes`` on the current weight and scale), and ``step * code`` is exactly the
weight the QAT model computed with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..convert import get_qat_config, qat_modules
from ..distributed import full_tensor
from ..errors import QATModelError
from ..lora import has_unmerged_adapters
from ..modules import QATEmbedding
from ..quantizers import Grid
from ..unit import UNIT_KEY



@dataclass
class QuantizedLayer:
    """One quantized weight as the formats see it.

    Attributes:
        name: module name ("model.layers.0.self_attn.q_proj").
        kind: "linear" or "embedding".
        codes: int8 ``[R, C]`` integer codes of ``grid``.
        step: fp32 ``[R or 1, n_groups]``: the weight is ``step * code`` (in fp32), cast to ``dtype``.
        grid, bits, method, group_size: the quantizer (``bits`` as configured, 1.58 for ternary).
        scale_dtype: what steps were rounded to in the forward pass.
        dtype: the weight's dtype.
        bias: the bias (linear layers), or None.
        activation_bits: 8 when the layer fake-quantized its input.
        tied_to: for an LM head that shares its weight with the input embedding, that module's name.
    """

    name: str
    kind: str
    codes: torch.Tensor
    step: torch.Tensor
    grid: Grid
    bits: float | int
    method: str
    group_size: int | str
    scale_dtype: torch.dtype
    dtype: torch.dtype
    bias: torch.Tensor | None
    activation_bits: int | None
    tied_to: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def collect_layers(model: nn.Module, keep: bool = True) -> tuple[list[QuantizedLayer], dict[str, torch.Tensor]]:
    """The quantized layers of a QAT model, and its other tensors by state-dict key (QAT state,
    quantized weights and their biases excluded), on the CPU.

    Under FSDP2 call it on every rank: it all-gathers one tensor at a time. A rank with
    ``keep=False`` takes part in the gathers and keeps nothing (returns ``([], {})``), so only the
    writing rank ever holds the whole model, and the others at most one gathered tensor."""
    if get_qat_config(model) is None:
        raise QATModelError("the model has no QAT modules: export a model prepared by hf_qat (QATCallback, "
                            "prepare_model_for_qat or ptq)")
    if has_unmerged_adapters(model):
        raise QATModelError("the model holds unmerged PEFT adapters: call model.merge_and_unload() first "
                            "(lora_mode='merged' exports exactly), or export the base model and save the adapters with PEFT")
    layers: list[QuantizedLayer] = []
    names_of_weight: dict[int, str] = {}
    covered: set[str] = set()
    for name, module in qat_modules(model):
        if not (module.is_qat_active and module.weight_quantizer.is_initialized):
            raise QATModelError(
                f"{name} has not switched to QAT yet (the run ended before the switch step?): there is no "
                "trained low-bit weight to export. Train past the switch, or call hf_qat.ptq(model, cfg) to "
                "export a round-to-nearest model"
            )
        kind = "embedding" if isinstance(module, QATEmbedding) else "linear"
        covered.update({f"{name}.weight", f"{name}.bias"})
        tied_to = names_of_weight.get(id(module.weight))
        unit = module.weight_quantizer
        weight = module.full_weight().detach()
        codes, step = unit.codes(weight)
        bias = getattr(module, "bias", None)
        bias = None if bias is None else full_tensor(bias).detach().cpu()
        names_of_weight.setdefault(id(module.weight), name)
        if not keep:
            continue
        layers.append(QuantizedLayer(
            name=name, kind=kind, codes=codes.cpu(), step=step.cpu(), grid=unit.spec.grid,
            bits=unit.quantizer.bits, method=unit.quantizer.name, group_size=unit.layout.group_size,
            scale_dtype=unit.spec.scale_dtype, dtype=weight.dtype,
            bias=bias, activation_bits=getattr(module, "activation_bits", None), tied_to=tied_to,
        ))
    others = {}
    for key, value in model.state_dict().items():
        if key in covered or UNIT_KEY in key:
            continue
        value = full_tensor(value).detach()
        if keep:
            others[key] = value.cpu()
    return layers, others
