"""The exceptions hf_qat raises. Each message names what was wrong and what is allowed."""

from __future__ import annotations

from typing import Any


class QATConfigError(ValueError):
    """A QATConfig field (or a value derived from one) is not allowed.

    Attributes:
        field: the field's name.
        value: the value it got.
        allowed: a human-readable description of the allowed values.
        detail: why, where the value alone does not say it ("" when it does).
    """

    def __init__(self, field: str, value: Any, allowed: str, detail: str = "") -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        self.detail = detail
        message = f"QATConfig.{field}={value!r} is not allowed; allowed: {allowed}"
        if detail:
            message += f". {detail}"
        super().__init__(message)


class QATModelError(ValueError):
    """The model does not fit the config: a missing target, a width the group size does not divide,
    a module type hf_qat cannot quantize, a model that is already prepared with another config."""


class QATRuntimeError(RuntimeError):
    """Something went wrong during training: NaN weights at the switch, a missing scale group, a
    distributed setup that QAT cannot run under as configured."""


class ExportFormatError(ValueError):
    """A layer's quantization cannot be written exactly in the requested format (or a model's settings in
    the file that format writes)."""


class MissingTokenizerError(ExportFormatError):
    """The format embeds the tokenizer (GGUF) and none was given."""
