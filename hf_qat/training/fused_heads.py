"""Trainers whose loss never runs the LM head module, and what hf_qat refuses with them.

Two popular ways of saving the logits' memory compute the training loss from ``lm_head.weight`` directly,
in tiles, instead of calling the head module:

* Liger's fused linear cross-entropy (``TrainingArguments(use_liger_kernel=True)``, on by default in its
  config), which replaces the model's forward when training starts;
* TRL's ``SFTTrainer`` (1.x), which adds a fused LM head to the model after the Trainer is built and calls
  ``model(..., fused_lm_head=True)``.

Both are fine for QAT of the other weights: the transformer layers still run their QAT modules. Two things
do not survive them, and are refused before the first step rather than trained silently wrong:

* a quantized LM head (``embedding_bits``, or a ``gguf_mix`` that quantizes the output): the loss would be
  computed with the float weight, so the head's fake quantization would never act;
* distillation, which needs the student's logits that a fused loss never materialises.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..config import QATConfig
from ..errors import QATModelError


def fused_head(model: nn.Module, args=None) -> tuple[str, str] | None:
    """``(who computes the loss from lm_head.weight, how to turn it off)`` for ``model`` trained with the
    TrainingArguments ``args``, or None when the loss runs the head module."""
    liger = ("Liger's fused linear cross-entropy (TrainingArguments(use_liger_kernel=True))",
             "liger_kernel_config={'fused_linear_cross_entropy': False}")
    config = getattr(args, "liger_kernel_config", None) or {}
    if getattr(args, "use_liger_kernel", False) and config.get("fused_linear_cross_entropy", True):
        return liger
    get_base = getattr(model, "get_base_model", None)  # PEFT: the transformers model is patched
    forward = getattr(get_base() if callable(get_base) else model, "forward", None)
    while forward is not None:  # through the wrappers (accelerate's, functools.wraps) to the patched forward
        function = getattr(forward, "__func__", forward)
        try:
            parameters = inspect.signature(function, follow_wrapped=False).parameters
        except (TypeError, ValueError):  # a callable without a Python signature: not TRL's forward
            parameters = {}
        if "fused_lm_head" in parameters:
            return "TRL's SFTTrainer, whose fused LM head", "transformers' Trainer"
        if getattr(function, "__module__", "").startswith("liger_kernel"):
            return liger
        forward = getattr(function, "__wrapped__", None)
    return None


def check_fused_head(model: nn.Module, args, config: QATConfig) -> None:
    """Raise QATModelError when a fused loss (:func:`fused_head`) would bypass a quantized LM head or starve
    distillation of the student's logits."""
    fused = fused_head(model, args)
    if fused is None:
        return
    who, instead = fused
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(head, "weight_quantizer", None) is not None:
        raise QATModelError(
            f"{who} computes the loss from lm_head.weight directly, so the LM head's fake quantization would never "
            "act. Leave the head in float (QATConfig(exclude_modules=['lm_head', 'embed_tokens']): a tied "
            f"embedding goes with it), or train with {instead}")
    if config.distill is not None:
        raise QATModelError(
            f"{who} never materialises the student's logits, which QATConfig.distill needs. Train with {instead}, "
            "or without distill")
