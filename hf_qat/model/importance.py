"""Importance of each input column of a weight, from calibration data: llama.cpp's importance matrix.

``llama-imatrix`` runs the full-precision model on calibration text and keeps, for every weight matrix, the
mean squared activation of each input column: a column that sees large inputs moves the layer's output
more per unit of weight error. Its strongest quantizers weight each block's squared error by it. hf_qat does
the same for the scales it starts from: after :func:`calibrate_importance`, ``scale_init="mse"`` searches each
group's clipping ratio by ``sum_c importance_c * (Q(w) - w)_c^2`` instead of the plain squared error
(:func:`hf_qat.quantizers.reference.mse_scale`, :func:`hf_qat.quantizers.kquants.ggml_mse_scale`), for the
PTQ baseline (``hf_qat.ptq(model, cfg, calibration=batches)``) and for the scales QAT starts from.

The importance lives on the unit (``WeightQuantizer.importance``, not saved: it is used once, when the scale
is initialised). Linear layers (the LM head included) get one; embeddings and fused expert stacks keep the
plain search. For QAT, call :func:`calibrate_importance` on ``trainer.model`` before ``trainer.train()``: the
switch then starts from the weighted search. Under DDP/FSDP2 pass the same batches on every rank (the
scales must be identical on every rank).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .modules import QATLinear
from .weights import qat_modules, require_qat_modules


@torch.no_grad()
def calibrate_importance(model: nn.Module, batches: Iterable[dict[str, Any] | torch.Tensor]) -> int:
    """Run ``model`` on ``batches`` (dicts of model inputs, or input-id tensors) and give every QAT Linear's
    unit the mean squared activation of each input column (fp32 ``[in]``) over every token it saw. Call it
    before the scales are initialised (``ptq`` and ``activate_qat`` initialise them), with QAT dormant so that
    the statistics are the full-precision model's, as llama.cpp's. Returns how many units got one."""
    require_qat_modules(model, "calibrate_importance")
    sums: dict[int, tuple[nn.Module, torch.Tensor, list[int]]] = {}
    hooks = []

    def hook(module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        unit = module.weight_quantizer
        _, total, count = sums.setdefault(id(unit), (unit, torch.zeros(x.shape[-1], device=x.device), [0]))
        total += x.pow(2).sum(0)
        count[0] += x.shape[0]

    for _, module in qat_modules(model):
        if isinstance(module, QATLinear):
            hooks.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    for unit, total, count in sums.values():
        unit.importance = total / max(count[0], 1)
    return len(sums)
