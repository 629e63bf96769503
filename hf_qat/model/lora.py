"""PEFT LoRA on QAT layers: which weight is fake-quantized.

``QATConfig(lora_mode=...)``:

* ``"merged"`` (default): the merged weight ``W + sum(scaling * B @ A)`` is fake-quantized, exactly as
  PEFT's ``merge_and_unload`` will add it. After training, ``model.merge_and_unload()`` gives a plain
  QAT model that computes what the model with adapters computed, bit for bit, and exports exactly.
  Needs ``lora_dropout=0`` and plain LoRA (no DoRA or LoRA bias): a merged weight cannot drop inputs.
* ``"base"``: only the frozen base weight is fake-quantized and the adapters run in full precision on
  top (QLoRA style). Keep the adapters separate (PEFT ``save_pretrained``): merging them moves the
  weights off the grid.

Apply PEFT first and pass ``QATCallback`` to the Trainer (or call ``prepare_model_for_qat`` on the
PEFT model): the QAT layers are installed inside PEFT's ``base_layer`` and the scales stay trainable.

LoRA on fused MoE expert weights (``LoraConfig(target_parameters=[...])``, PEFT's ``ParamWrapper``) is
refused (:func:`refuse_expert_adapters`): during its forward PEFT registers a torch parametrization on
the experts module that moves the expert Parameter out of the module's parameters and serves
``W + delta`` instead, so hf_qat's experts layer can neither quantize ``W + delta`` as one weight
(merged mode) nor the base weight alone (base mode). Put LoRA on the Linear layers (target_modules).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..errors import QATModelError
from .modules import QATLinear
from .unit import WeightQuantizer



def _lora_linear_type():
    try:
        from peft.tuners.lora import Linear
    except ImportError:
        return None
    return Linear


def refuse_expert_adapters(model: nn.Module) -> None:
    """Raise QATModelError when PEFT LoRA targets fused expert Parameters (see the module docstring)."""
    try:
        from peft.tuners.lora import ParamWrapper
    except ImportError:
        return
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            raise QATModelError(
                f"{name}: PEFT LoRA on the fused expert weight {module.parameter_name!r} (LoraConfig.target_parameters) "
                "cannot be combined with QAT: PEFT serves W + delta through a torch parametrization it registers "
                "during its own forward, which moves the Parameter out of the experts module, so hf_qat can quantize "
                "neither W + delta (lora_mode='merged') nor W alone (lora_mode='base'). Put LoRA on Linear layers "
                "(LoraConfig.target_modules) and leave target_parameters unset"
            )


def attach_lora(model: nn.Module, mode: str) -> int:
    """Link every PEFT LoRA Linear that wraps a QATLinear to it according to ``mode``; returns how many.
    Where there is one, every unit's scale is made trainable again (PEFT freezes the whole base model,
    scales included, when it is applied after the QAT layers were installed)."""
    lora_linear = _lora_linear_type()
    if lora_linear is None:
        return 0
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, lora_linear) and isinstance(module.get_base_layer(), QATLinear):
            if mode == "merged":
                _quantize_merged_weight(module, name)
            count += 1
    if count:
        for module in model.modules():
            if isinstance(module, WeightQuantizer) and module.log_scale_ratio is not None:
                module.log_scale_ratio.requires_grad_(True)
    return count


def _quantize_merged_weight(layer: nn.Module, name: str) -> None:
    if getattr(layer, "_hf_qat_merged_mode", False):
        return
    for adapter in layer.lora_A:
        if not isinstance(layer.lora_dropout[adapter], nn.Identity):
            raise QATModelError(f"{name}: lora_mode='merged' needs lora_dropout=0 (a merged weight cannot drop inputs); "
                                "set LoraConfig(lora_dropout=0.0) or QATConfig(lora_mode='base')")
        if adapter in getattr(layer, "lora_variant", {}) or layer.lora_bias.get(adapter, False):
            raise QATModelError(f"{name}: lora_mode='merged' supports plain LoRA (no DoRA / variants, no lora_bias)")
    # PEFT's LoRA Linear calls base_layer(x) and adds the adapters' output; in merged mode the base
    # layer must quantize W + delta instead, so the instance's forward is replaced (PEFT offers no
    # hook for it). The flag marks the replacement so preparing twice does not stack it.
    layer.forward = types.MethodType(_merged_forward, layer)
    layer._hf_qat_merged_mode = True


def detach_lora(model: nn.Module, baked: bool) -> None:
    """Undo :func:`attach_lora` before the QAT layers are removed: each merged-mode LoRA layer gets
    PEFT's forward back. ``baked``: the base weights of active QAT layers now hold ``Q(W + delta)``,
    so their adapters are marked merged (PEFT then computes with the base weight alone, the delta
    counted once, and ``merge_and_unload`` keeps that weight)."""
    for module in model.modules():
        if not getattr(module, "_hf_qat_merged_mode", False):
            continue
        if baked and module.get_base_layer().is_qat_active and merged_delta(module) is not None:
            module.merged_adapters.extend(a for a in module.active_adapters if a in module.lora_A)
        del module.forward
        del module._hf_qat_merged_mode


def merged_delta(layer: nn.Module) -> torch.Tensor | None:
    """``sum(scaling * B @ A)`` over the active adapters of a PEFT LoRA Linear (None when merged,
    disabled or without adapters): what ``merge_and_unload`` will add to the base weight."""
    if layer.merged or layer.disable_adapters:
        return None
    total = None
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            d = layer.get_delta_weight(adapter)
            total = d if total is None else total + d
    return total


def weight_deltas(model: nn.Module) -> dict[int, torch.Tensor]:
    """``id(QATLinear) -> merged LoRA delta`` for the QAT layers under merged-mode adapters (the
    explicit input the units quantize with the weight)."""
    out = {}
    for module in model.modules():
        if getattr(module, "_hf_qat_merged_mode", False):
            delta = merged_delta(module)
            if delta is not None:
                out[id(module.get_base_layer())] = delta
    return out


def _merged_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Once QAT is on: the base layer alone, quantizing W + delta. Before it: PEFT's forward."""
    base = self.get_base_layer()
    if not base.is_qat_active or self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    return base(x, weight_delta=merged_delta(self))


def is_peft_model(model: nn.Module) -> bool:
    """A PEFT model (its checkpoints hold only the adapters' keys)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def has_unmerged_adapters(model: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) and not m.merged for m in model.modules())
