"""compressed-tensors ``pack-quantized`` (transformers with the compressed-tensors package, and vLLM).

Per Linear: ``weight_packed`` int32 ``[out, ceil(in * b / 32)]`` (codes + 2^(b-1) in b-bit fields,
element 0 lowest: ``kernels.pack.pack_int32``), ``weight_scale`` ``[out, groups]`` (or ``[out, 1]`` per
channel) in the weight dtype, ``weight_shape``. compressed-tensors dequantizes ``q * scale`` in the
scale's dtype: exactly the QAT weight when the step is representable in the weight dtype.

Fused MoE experts are written as the model family's original per-expert checkpoint tensors
(``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight_packed``; Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``),
the names transformers' conversion mapping merges back into the fused Parameters on load and vLLM reads.
The names come from transformers itself (``revert_weight_conversion``, what ``save_pretrained`` uses),
applied to the codes and steps, so each expert's rows are packed as a Linear. A family whose mapping
keeps the experts fused (gpt_oss) has no per-expert names, and transformers decompresses compressed
experts only through such a mapping: it is refused.

Exact grids: LSQ 4/8-bit, SEQ 2-bit (odd codes -3..3 with step s/4 on the 4-bit grid), and any grid
whose codes fit 4 or 8 signed bits (ternary, binary, 3/5/6-bit) in a wider container. Only 4- and
8-bit containers are written (other widths straddle int32 words in compressed-tensors 0.20).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.pack import pack_int32
from .base import (ExportFormat, ExportFormatError, ExportInfo, register_format, save_tensors, tensor_bytes,
                   write_model_config)
from .layers import QuantizedLayer


def per_expert_names(model: nn.Module, name: str) -> list[str]:
    """The checkpoint keys transformers writes for the fused expert stack ``name`` in the model's
    original format (``save_pretrained``'s ``revert_weight_conversion``), in expert order; one key
    (``name`` itself) when the family keeps its experts fused."""
    from transformers.core_model_loading import revert_weight_conversion

    stack = model.get_parameter(name)
    return list(revert_weight_conversion(model, {name: torch.empty(stack.shape, dtype=torch.int8, device="meta")}))


def _write_packed(tensors: dict[str, torch.Tensor], prefix: str, codes: torch.Tensor, step: torch.Tensor, bits: int,
                  dtype: torch.dtype) -> None:
    """``<prefix>.weight_packed / weight_scale / weight_shape`` of one ``[out, in]`` matrix."""
    tensors[f"{prefix}.weight_packed"] = pack_int32(codes.to(torch.int64) + (1 << (bits - 1)), bits)
    tensors[f"{prefix}.weight_scale"] = step.to(dtype)
    tensors[f"{prefix}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)


def _container_bits(layer: QuantizedLayer) -> int | None:
    lo, hi = min(layer.grid.codes), max(layer.grid.codes)
    for bits in (4, 8):
        if -(1 << (bits - 1)) <= lo and hi <= (1 << (bits - 1)) - 1:
            return bits
    return None


@register_format
class CompressedTensorsFormat(ExportFormat):
    name = "compressed-tensors"
    auto_priority = 0  # loads without hf_qat, in transformers and vLLM
    tags = ("compressed-tensors",)

    def auto_accepts(self, layers: list[QuantizedLayer]) -> bool:
        """Every layer a METHOD.md section-6 row (LSQ 4/8-bit or SEQ 2-bit, group or channel, Linear)."""
        return all(self.problem(layer) is None and self.native_width(layer) for layer in layers)

    def problem(self, layer: QuantizedLayer) -> str | None:
        if layer.kind == "experts" and layer.group_size == "tensor":
            return "per-tensor scales are not written to compressed-tensors here (use group or channel scales)"
        if layer.kind == "embedding" or layer.tied_to is not None:
            return "compressed-tensors pack-quantized stores Linear layers only (not quantized embeddings)"
        if _container_bits(layer) is None:
            return "its codes do not fit signed 4 or 8 bits"
        if layer.group_size == "tensor":
            return "per-tensor scales are not written to compressed-tensors here (use group or channel scales)"
        if layer.activation_bits:
            return ("its int8 activations: compressed-tensors rounds x / (max|x| / 127) where the QAT model (and "
                    "transformers' BitNet) rounds x * (127 / max|x|), so some activations would land on another "
                    "integer and the export would compute something else")
        if not torch.equal(layer.step.to(layer.dtype).float(), layer.step):
            return (f"its steps (rounded to {layer.scale_dtype}) are not representable in the weight dtype {layer.dtype}, "
                    "where compressed-tensors stores scales; train with scale_dtype matching the weights or export in float32")
        return None

    def native_width(self, layer: QuantizedLayer) -> bool:
        """True for the METHOD.md rows: the container is the trained width (LSQ 4/8) or SEQ 2-bit."""
        return (layer.method in ("lsq", "absmax") and layer.bits in (4, 8)) or (layer.method == "seq" and layer.bits == 2)

    def storage_bits(self, layer: QuantizedLayer) -> float:
        return float(_container_bits(layer))

    def scale_bytes(self, layer: QuantizedLayer) -> int:
        return layer.step.numel() * torch.empty((), dtype=layer.dtype).element_size()  # stored in the weight dtype

    def check_model(self, model: nn.Module, layers: list[QuantizedLayer], tokenizer=None) -> None:
        for layer in layers:
            if layer.kind == "experts" and len(per_expert_names(model, layer.name)) == 1:
                raise ExportFormatError(
                    f"{layer.name}: transformers' conversion mapping for model type {model.config.model_type!r} keeps "
                    "these experts fused in the checkpoint (no per-expert tensor names), and transformers loads "
                    "compressed-tensors experts only as per-expert tensors that its mapping merges: the export would "
                    "not load. Use format='hf-qat', or exclude the experts from QAT"
                )

    def write(self, model: nn.Module, layers, others, out_dir, tokenizer=None) -> ExportInfo:
        from transformers.core_model_loading import revert_weight_conversion

        tensors = dict(others)
        experts: dict[str, torch.Tensor] = {}
        groups: dict[tuple, list[str]] = {}
        notes = []
        for layer in layers:
            bits = _container_bits(layer)
            if layer.kind == "experts":  # each expert's [out, in] rows under its original checkpoint name
                codes, steps = layer.expert_codes_and_steps()
                expert_codes = revert_weight_conversion(model, {layer.name: codes})
                expert_steps = revert_weight_conversion(model, {layer.name: steps})
                for key, expert in expert_codes.items():
                    _write_packed(experts, key.removesuffix(".weight"), expert, expert_steps[key], bits, layer.dtype)
            else:
                _write_packed(tensors, layer.name, layer.codes, layer.step, bits, layer.dtype)
            if layer.bias is not None:
                tensors[f"{layer.name}.bias"] = layer.bias
            key = (bits, layer.group_size, layer.activation_bits)
            groups.setdefault(key, []).append(layer.name)
            if bits != {1: 1, 1.58: 2}.get(layer.bits, layer.bits) and not self.native_width(layer):
                notes.append(f"{layer.name}: {layer.bits}-bit codes stored in a {bits}-bit container")
        config_groups = {}
        single = len(groups) == 1
        for i, ((bits, group_size, act_bits), names) in enumerate(groups.items()):
            weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
                       "strategy": "channel" if group_size == "channel" else "group",
                       "group_size": None if group_size == "channel" else group_size}
            scheme = {"targets": ["Linear"] if single else names, "weights": weights, "input_activations": None,
                      "output_activations": None}
            config_groups[f"group_{i}"] = scheme
        quantized = {layer.name for layer in layers}
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and n not in quantized]
        quantization_config = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None,
        }
        if experts:  # the rest in the original format too (e.g. Mixtral's mlp.gate -> block_sparse_moe.gate)
            tensors = {**revert_weight_conversion(model, tensors), **experts}
        files = write_model_config(model, out_dir, quantization_config)
        files += save_tensors(tensors, out_dir)
        return ExportInfo(format=self.name, path=out_dir, files=files, weight_bytes=tensor_bytes(tensors),
                          notes=sorted(set(notes)))
