"""Loading a causal LM to train with QAT, including from a GGUF file.

transformers dequantizes a GGUF checkpoint at load time but leaves the model marked as quantized
(``is_quantized``, ``hf_quantizer``, ``config.quantization_config``), and the Trainer refuses to train a
quantized model. The weights are plain floating-point tensors by then, so :func:`load_for_training`
clears the marks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def clear_gguf_marks(model: nn.Module) -> nn.Module:
    """Remove the quantization marks a GGUF load leaves on an already dequantized model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and type(quantizer).__name__ != "GgufHfQuantizer":
        raise ValueError(f"the model is quantized by {type(quantizer).__name__}, not a dequantized GGUF load")
    model.is_quantized = False
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_for_training(name_or_path: str, gguf_file: str | None = None, dtype: str | torch.dtype | None = None,
                      **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` for training: a GGUF file is dequantized and unmarked."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    return clear_gguf_marks(model) if gguf_file is not None else model
