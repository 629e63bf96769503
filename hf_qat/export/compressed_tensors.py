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

The block-scaled FP4 families are written in compressed-tensors' own formats, with the scheme of its
presets (each family names its format and preset: ``Quantizer.compressed_tensors_scheme``; type "float",
4 bits, symmetric, groups of 32 / tensor groups of 16): MXFP4's pack-quantized format (``weight_packed``
uint8 ``[out, in / 2]``, element 2i in the low nibble, bit 3 the sign; ``weight_scale`` uint8 E8M0
``[out, in / 32]``) and NVFP4's (the same, with ``weight_scale`` float8_e4m3fn ``[out, in / 16]`` and
``weight_global_scale`` f32 ``[1]``; the weight is ``q * (weight_scale / weight_global_scale)``).
compressed-tensors decompresses them in bfloat16, where
every QAT weight of these families is exact (:mod:`hf_qat.quantizers.block_scales`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.pack import pack_int32
from ..errors import ExportFormatError
from ..export_formats import register_format
from .base import (ExportFormat, ExportInfo, refusal, save_tensors, tensor_bytes,
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


def _own_format(layer: QuantizedLayer) -> bool:
    """Whether the layer's family has a compressed-tensors format of its own (the FP4 families')."""
    return layer.family.compressed_tensors_scheme is not None


def _write_fp4(tensors: dict[str, torch.Tensor], prefix: str, layer: QuantizedLayer, codes: torch.Tensor,
               scale: torch.Tensor, global_scale: torch.Tensor | None) -> None:
    """``<prefix>.weight_packed / weight_scale (/ weight_global_scale)`` of one FP4 ``[out, in]`` matrix."""
    nibbles = layer.family.nibbles(codes)
    tensors[f"{prefix}.weight_packed"] = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    tensors[f"{prefix}.weight_scale"] = scale
    if global_scale is not None:
        tensors[f"{prefix}.weight_global_scale"] = global_scale.reshape(1).clone()


# Linear layers that vLLM fuses into one (q/k/v; gate/up) and then scales by ONE NVFP4 global scale.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def shared_nvfp4_scales(layers: list[QuantizedLayer]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (E4M3 block scales, global scale)`` of the NVFP4 Linear layers, siblings that vLLM fuses
    sharing one global scale: the smallest of theirs g, each sibling's block scales multiplied by g / g_i
    (a power of two, so the weight ``q * s_b / g`` is unchanged) where that is exact in E4M3; raises
    ExportFormatError naming the layers where it is not (a block scale would underflow)."""
    scales = {layer.name: layer.family.stored_scales(layer.step) for layer in layers
              if _own_format(layer) and layer.family.tensor_scale and layer.kind == "linear"}
    for group in FUSED_SIBLINGS:
        families: dict[str, list[str]] = {}
        for name in scales:
            parent, _, leaf = name.rpartition(".")
            if leaf in group:
                families.setdefault(parent, []).append(name)
        for names in families.values():
            shared = min(float(scales[n][1]) for n in names)
            for name in names:
                block, own = scales[name]
                moved = (block.float() * (shared / float(own))).to(torch.float8_e4m3fn)
                if not torch.equal(moved.float(), block.float() * (shared / float(own))):
                    raise ExportFormatError(
                        f"{', '.join(names)}: vLLM fuses these layers and scales them by one NVFP4 global scale, but "
                        f"{name}'s block scales cannot move to the shared one ({shared:g} instead of {float(own):g}) "
                        "exactly in E4M3. Formats that can: gguf, hf-qat")
                scales[name] = (moved, torch.tensor(shared, dtype=torch.float32))
    return scales


def _scheme(layer: QuantizedLayer, bits: int | None) -> dict:
    """The config_groups entry (without targets) of a layer's quantization."""
    if _own_format(layer):
        from compressed_tensors.quantization import preset_name_to_scheme

        compression, preset = layer.family.compressed_tensors_scheme
        scheme = preset_name_to_scheme(preset, ["Linear"]).model_dump(mode="json")
        return {**scheme, "format": compression}
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "channel" if layer.group_size == "channel" else "group",
               "group_size": None if layer.group_size == "channel" else layer.group_size}
    return {"weights": weights, "input_activations": None, "output_activations": None}


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
    load_requires = ("compressed_tensors",)

    def auto_accepts(self, layers: list[QuantizedLayer]) -> bool:
        """Every layer a row of docs/formats.md's table (LSQ 4/8-bit or SEQ 2-bit, group or channel, Linear) or
        MXFP4 / NVFP4."""
        return all(refusal(self, layer) is None and self.native_width(layer) for layer in layers)

    def problem(self, layer: QuantizedLayer) -> str | None:
        if layer.kind == "experts" and layer.group_size == "tensor":
            return "per-tensor scales are not written to compressed-tensors here (use group or channel scales)"
        if layer.kind == "embedding" or layer.tied_to is not None:
            return "compressed-tensors pack-quantized stores Linear layers only (not quantized embeddings)"
        if _own_format(layer) and not layer.activation_bits:
            if layer.dtype != torch.bfloat16:
                return (f"compressed-tensors 0.20 decompresses {layer.family.compressed_tensors_scheme[0]} weights to bfloat16 "
                        f"whatever the model's dtype ({layer.dtype} here): transformers' Linear then multiplies "
                        f"{layer.dtype} activations by a bfloat16 weight and fails ('expected m1 and m2 to have the "
                        "same dtype'). Train in bfloat16 for this format, or export format='hf-qat' or 'gguf'")
            if layer.kind == "experts" and layer.family.tensor_scale:
                return ("transformers 5.24 merges compressed-tensors experts without their weight_global_scale: NVFP4 "
                        "experts would load g times too large (seen: 16384 x on a tiny Qwen3-MoE). Export "
                        "format='hf-qat' or 'gguf', or train the experts on MXFP4")
            return None  # its own format: codes and scales as compressed-tensors stores them
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
                    "where compressed-tensors stores scales; train with scale_dtype='auto' (scales in the weights' dtype; the "
                    "default with export_format='compressed-tensors') or export in float32")
        return None

    def native_width(self, layer: QuantizedLayer) -> bool:
        """True for the rows of docs/formats.md's table: the container is the trained width (LSQ 4/8) or SEQ 2-bit."""
        return ((layer.method in ("lsq", "absmax") and layer.bits in (4, 8)) or (layer.method == "seq" and layer.bits == 2)
                or _own_format(layer))

    def storage_bits(self, layer: QuantizedLayer) -> float:
        return 4.0 if _own_format(layer) else float(_container_bits(layer))

    def scale_bytes(self, layer: QuantizedLayer) -> int:
        if _own_format(layer):  # one byte per block; NVFP4 adds an fp32 per matrix (each expert's)
            matrices = layer.weight_shape[0] if layer.kind == "experts" else 1
            return layer.step.numel() + (4 * matrices if layer.family.tensor_scale else 0)
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
        nvfp4_scales = shared_nvfp4_scales(layers)
        experts: dict[str, torch.Tensor] = {}
        groups: dict[tuple, list[str]] = {}
        notes = []
        for layer in layers:
            bits = _container_bits(layer)
            if layer.kind == "experts":  # each expert's [out, in] rows under its original checkpoint name
                codes, steps = layer.expert_codes_and_steps()
                expert_codes = revert_weight_conversion(model, {layer.name: codes})
                if _own_format(layer):  # one per-tensor scale for the whole stack: every expert's (gate and up alike)
                    scales, global_scale = layer.family.stored_scales(steps)
                    expert_scales = revert_weight_conversion(model, {layer.name: scales.view(torch.uint8)})
                    for key, expert in expert_codes.items():
                        _write_fp4(experts, key.removesuffix(".weight"), layer, expert,
                                   expert_scales[key].contiguous().view(scales.dtype), global_scale)
                else:
                    expert_steps = revert_weight_conversion(model, {layer.name: steps})
                    for key, expert in expert_codes.items():
                        _write_packed(experts, key.removesuffix(".weight"), expert, expert_steps[key], bits, layer.dtype)
            elif _own_format(layer):
                _write_fp4(tensors, layer.name, layer, layer.codes,
                           *nvfp4_scales.get(layer.name) or layer.family.stored_scales(layer.step))
            else:
                _write_packed(tensors, layer.name, layer.codes, layer.step, bits, layer.dtype)
            if layer.bias is not None:
                tensors[f"{layer.name}.bias"] = layer.bias
            scheme = _scheme(layer, bits)
            groups.setdefault(repr(scheme), (scheme, []))[1].append(layer.name)
            if not _own_format(layer) and bits != {1: 1, 1.58: 2}.get(layer.bits, layer.bits) and not self.native_width(layer):
                notes.append(f"{layer.name}: {layer.bits}-bit codes stored in a {bits}-bit container")
        single = len(groups) == 1
        config_groups = {f"group_{i}": {**scheme, "targets": ["Linear"] if single else names}
                         for i, (scheme, names) in enumerate(groups.values())}
        formats = {scheme.get("format", "pack-quantized") for scheme, _ in groups.values()}
        quantized = {layer.name for layer in layers}
        ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n and n not in quantized]
        quantization_config = {
            "quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": ignore,
            "kv_cache_scheme": None,
        }
        if experts:  # the rest in the original format too (e.g. Mixtral's mlp.gate -> block_sparse_moe.gate)
            tensors = {**revert_weight_conversion(model, tensors), **experts}
        files = write_model_config(model, out_dir, quantization_config)
        files += save_tensors(tensors, out_dir)
        return ExportInfo(format=self.name, path=out_dir, files=files, weight_bytes=tensor_bytes(tensors),
                          notes=sorted(set(notes)))
