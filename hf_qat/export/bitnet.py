"""transformers BitNet (``quant_method: "bitnet"``) for per-tensor ternary QAT.

Per Linear: ``weight`` uint8 ``[out / 4, in]``: codes {-1, 0, 1} stored as {0, 1, 2}; packed row r holds
original rows ``i * out / 4 + r`` in bit pair i. ``weight_scale`` ``(1,)`` is the inverse of the
per-tensor step (BitLinear divides by it). BitLinear also quantizes activations to int8 per token with
absmax 127, so the export reproduces the QAT model (up to the rounding of the matmul) only when QAT
ran with ``activation_bits=8``; otherwise the export says so.
"""

from __future__ import annotations

import torch
from torch import nn

from ..bits import TERNARY_BITS
from ..export_formats import register_format
from .base import ExportFormat, ExportInfo, save_tensors, tensor_bytes, write_model_config
from .layers import QuantizedLayer


def pack_bitnet(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes ``[out, in]`` -> transformers BitNet's ``uint8 [out / 4, in]``."""
    rows = codes.shape[0]
    u = (codes.to(torch.int16) + 1).to(torch.uint8).view(4, rows // 4, -1)
    return u[0] | (u[1] << 2) | (u[2] << 4) | (u[3] << 6)


@register_format
class BitNetFormat(ExportFormat):
    name = "bitnet"
    auto_priority = 1

    def auto_accepts(self, layers: list[QuantizedLayer]) -> bool:
        """Per-tensor ternary with int8 activations everywhere (transformers' BitLinear)."""
        return super().auto_accepts(layers) and all(layer.activation_bits == 8 for layer in layers)
    tags = ("bitnet", "ternary")

    def problem(self, layer: QuantizedLayer) -> str | None:
        if layer.kind != "linear" or layer.tied_to is not None:
            return "BitNet stores Linear layers only"
        if layer.bits != TERNARY_BITS or layer.grid.codes != [-1, 0, 1]:
            return "BitNet stores ternary weights (bits=1.58)"
        if layer.group_size != "tensor":
            return "BitNet has one scale per tensor (group_size='tensor')"
        if layer.shape[0] % 4:
            return f"BitNet packs 4 rows per byte; {layer.shape[0]} rows is not a multiple of 4"
        if layer.bias is not None:
            return "BitNet's offline BitLinear has no trained bias"
        return None

    def storage_bits(self, layer: QuantizedLayer) -> float:
        return 2.0

    def scale_bytes(self, layer: QuantizedLayer) -> int:
        return torch.empty((), dtype=layer.dtype).element_size()  # one inverse scale in the weight dtype

    def write(self, model: nn.Module, layers, others, out_dir, tokenizer=None) -> ExportInfo:
        tensors = dict(others)
        for layer in layers:
            tensors[f"{layer.name}.weight"] = pack_bitnet(layer.codes)
            tensors[f"{layer.name}.weight_scale"] = (1.0 / layer.step.reshape(1)).to(layer.dtype)
        quantized = {layer.name for layer in layers}
        skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and n not in quantized]
        notes = []
        if any(layer.activation_bits != 8 for layer in layers):
            notes.append("BitNet layers quantize activations to int8 per token; this model was trained without "
                         "activation quantization, so the export differs from the QAT model")
        quantization_config = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
                               "modules_to_not_convert": skip or None, "use_rms_norm": False}
        files = write_model_config(model, out_dir, quantization_config)
        files += save_tensors(tensors, out_dir)
        return ExportInfo(format=self.name, path=out_dir, files=files, weight_bytes=tensor_bytes(tensors),
                          exact=not notes, notes=notes)
