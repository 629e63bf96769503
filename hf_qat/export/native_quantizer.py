"""The transformers quantizer of the native format (``quant_method: "hf_qat"``).

Importing hf_qat registers it, so ``AutoModelForCausalLM.from_pretrained(dir)`` rebuilds the packed
low-bit layers of an ``export_checkpoint(..., format="hf-qat")`` directory. Without hf_qat imported,
transformers ignores an unknown ``quant_method`` and would load random Linear weights: the checkpoint's guard
tensor (a 1-D text under a plain weight key, ``quantization_config["guard"]``) makes it refuse instead, with a
size mismatch; this quantizer skips the guard (checkpoints written before the guard load as they did).

Loading checks that every packed tensor came from the checkpoint: a missing ``weight_packed`` or
``weight_step`` is an error, never a silently random layer. The quantizer declares itself
QAT-trainable, so the Trainer accepts a loaded native checkpoint (``QATCallback`` turns its packed
layers back into trainable QAT layers).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import QATModelError
from .packed_modules import PackedExperts, PackedWeight, replace_with_packed

QUANT_METHOD = "hf_qat"
FORMAT_VERSION = 1
# The guard tensor's bytes (what a reader who opens the file finds there).
GUARD_TEXT = "hf_qat native format: import hf_qat before from_pretrained, or this checkpoint loads nothing"


def guard_tensor() -> torch.Tensor:
    """The guard: :data:`GUARD_TEXT` as 1-D uint8, saved under a plain weight key (a shape no plain layer has)."""
    return torch.frombuffer(bytearray(GUARD_TEXT.encode()), dtype=torch.uint8)


class HfQatQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a native checkpoint: ``modules`` maps each quantized layer to its
    shape, code table, storage bits, scale shape and dtype; ``qat_config`` is the QATConfig it was
    trained with. Unknown keys are kept (forward compatible)."""

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, format_version: int = FORMAT_VERSION,
                 qat_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = modules or {}
        self.qat_config = qat_config or {}
        for key, value in kwargs.items():
            setattr(self, key, value)
        if self.format_version > FORMAT_VERSION:
            raise ValueError(f"this hf_qat reads native format version {FORMAT_VERSION}; the checkpoint is version "
                             f"{self.format_version}: upgrade hf_qat")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class HfQatQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: HfQatQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._dtype = torch.float32

    def update_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        self._dtype = dtype or torch.float32
        return self._dtype

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("the hf_qat format is written by hf_qat.export_checkpoint; it cannot quantize a model at load time")

    def _process_model_before_weight_loading(self, model, **kwargs: Any) -> None:
        dtype = kwargs.get("dtype") or self._dtype
        replace_with_packed(model, self.quantization_config.modules, dtype if isinstance(dtype, torch.dtype) else self._dtype)
        guard = getattr(self.quantization_config, "guard", None)
        if guard is not None:  # the tensor that stops a load without hf_qat: not a weight of the packed model
            model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()),
                                                        f"^{re.escape(guard)}$"}

    def _process_model_after_weight_loading(self, model, **kwargs: Any) -> None:
        # transformers marks every tensor it loaded with _is_hf_initialized; a packed tensor without
        # the mark was missing (or mismatched) and holds uninitialised memory.
        loaded = lambda t: not t.is_meta and getattr(t, "_is_hf_initialized", False)  # noqa: E731
        missing = [
            f"{name}.{buffer}" for name, module in model.named_modules() if isinstance(module, PackedWeight)
            for buffer in ("weight_packed", "weight_step") if not loaded(getattr(module, buffer))
        ] + [  # a packed experts module is marked initialised: its other tensors must come from the checkpoint
            f"{name}.{key}" for name, module in model.named_modules() if isinstance(module, PackedExperts)
            for key, tensor in module.named_parameters(recurse=False) if not loaded(tensor)
        ]
        if missing:
            raise QATModelError(
                f"the checkpoint lacks {len(missing)} packed tensors of the hf_qat format (e.g. {missing[0]}): it is "
                "incomplete or does not match its quantization_config"
            )

    def is_serializable(self) -> bool:
        return True

    def get_state_dict_and_metadata(self, model):
        """save_pretrained of a loaded native checkpoint writes its guard back (the packed model holds none)."""
        guard = getattr(self.quantization_config, "guard", None)
        return (None if guard is None else {**model.state_dict(), guard: guard_tensor()}), {}

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not HfQatQuantizationConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(HfQatQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HfQatQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(HfQatQuantizer)
