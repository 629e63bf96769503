"""The scales' place in the optimizer: a param group of their own (no weight decay, their own peak LR).

Used by QATCallback (it wraps the Trainer's ``create_optimizer``) and by the sweep's training loop.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..model.convert import quantizer_units

SCALE_GROUP_KEY = "hf_qat_scales"  # the marker of the scales' param group


def scale_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The learnable scale Parameters (each unit's ``log_scale_ratio``) of a prepared model, in module order."""
    return [module.weight_quantizer.log_scale_ratio for _, module in quantizer_units(model)
            if module.weight_quantizer.log_scale_ratio is not None and module.weight_quantizer.log_scale_ratio.requires_grad]


def add_scale_param_group(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                          scale_peak_lr: Callable[[float], float]) -> bool:
    """Move the scales of ``model`` out of the optimizer's groups into a group of their own
    (``weight_decay=0``, peak LR ``scale_peak_lr(peak base LR)`` (``QATConfig.scale_peak_lr``) at the
    same point of the schedule as the weights, marked with ``hf_qat_scales=True``).

    Must run before a scheduler is built on the optimizer. Returns False when there is nothing to
    move (no scales, or the optimizer does not hold them).
    """
    scales = {id(p): p for p in scale_parameters(model)}
    groups = getattr(optimizer, "param_groups", None)
    if not scales or groups is None or has_scale_group(optimizer):
        return False
    template = None
    for group in groups:
        kept = [p for p in group["params"] if id(p) not in scales]
        if len(kept) != len(group["params"]):
            template = template or group
            group["params"] = kept
    if template is None:
        return False
    peak = template.get("initial_lr", template["lr"])
    scale_peak = scale_peak_lr(peak)
    new_group = {k: v for k, v in template.items() if k != "params"}
    new_group.update(params=list(scales.values()), weight_decay=0.0,
                     lr=template["lr"] * scale_peak / peak if peak else 0.0)
    new_group[SCALE_GROUP_KEY] = True
    if "initial_lr" in new_group:
        new_group["initial_lr"] = scale_peak
    optimizer.add_param_group(new_group)
    return True


def has_scale_group(optimizer) -> bool:
    return any(g.get(SCALE_GROUP_KEY) for g in getattr(optimizer, "param_groups", None) or [])


def reset_weight_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Clear the optimizer state of the quantized weights (``QATConfig.reset_optimizer_state``)."""
    weights = {id(module.weight) for _, module in quantizer_units(model)}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) in weights:
                optimizer.state.pop(param, None)
