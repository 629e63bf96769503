"""The native format ("hf-qat"): every grid of hf_qat's own (integer, ternary, binary, FP4), packed at its own bit
width. llama.cpp's block families (their blocks go to GGUF only) and scaled word embeddings (Gemma's) it refuses.

Per quantized layer: ``<name>.weight_packed`` (uint8, the code indices in the ``kernels.pack``
bitstream at ``ceil(log2(#codes))`` bits: 1 for binary, 2 for ternary and 2-bit, b for b-bit LSQ) and
``<name>.weight_step`` (the per-group steps, in the scale dtype they were rounded to; bfloat16, which holds
them exactly, for the FP8 block scales of MXFP4 / NVFP4). A fused expert
stack ``<experts>.<P>`` stores the same two tensors of its matrix under ``<experts>.<P>_packed.``, with
its stored shape and layout in the config. An LM head tied to the quantized embedding stores nothing
of its own. Loads through the transformers quantizer that
importing hf_qat registers (``native_quantizer.py``). A guard tensor (``quantization_config["guard"]``: a
1-D uint8 text under the plain weight key of the first quantized layer) makes transformers refuse the
checkpoint where hf_qat is not imported (a size mismatch), instead of loading random weights in its place.
"""

from __future__ import annotations

import torch

from ..export_formats import register_format
from ..kernels.pack import pack_bits
from ..model.convert import get_qat_config
from .base import (ExportFormat, ExportInfo, dtype_name, save_tensors, tensor_bytes,
                   write_model_config)
from .layers import QuantizedLayer
from .native_quantizer import FORMAT_VERSION, QUANT_METHOD, guard_tensor
from .packed_modules import PACKED_SUFFIX, index_bits


def code_indices(codes: torch.Tensor, table: list[int]) -> torch.Tensor:
    """Position of every code in the sorted code table."""
    return torch.searchsorted(torch.tensor(table, dtype=torch.float32), codes.float().contiguous())


@register_format
class NativeFormat(ExportFormat):
    name = "hf-qat"
    auto_priority = 99  # the widest; needs hf_qat to load, so last
    needs_hf_qat = True
    tags = ("hf_qat",)

    def problem(self, layer: QuantizedLayer) -> str | None:
        if layer.embed_scale is not None:  # its packed embedding looks rows up, nothing more
            return (f"the native format stores a plain embedding, and {layer.name} multiplies its rows by "
                    f"{layer.embed_scale:g} (a scaled word embedding)")
        return None

    def storage_bits(self, layer: QuantizedLayer) -> float:
        return 0.0 if layer.tied_to else float(index_bits(len(layer.grid.codes)))

    def write(self, model, layers, others, out_dir, tokenizer=None) -> ExportInfo:
        tensors = dict(others)
        modules = {}
        for layer in layers:
            table = layer.grid.codes
            modules[layer.name] = {
                "kind": layer.kind, "shape": list(layer.shape), "scale_shape": list(layer.step.shape),
                "codes": table, "storage_bits": index_bits(len(table)), "bits": layer.bits, "method": layer.method,
                "group_size": layer.group_size, "scale_dtype": dtype_name(layer.step_dtype),
                "activation_bits": layer.activation_bits, "bias": layer.bias is not None, "tied_to": layer.tied_to,
            }
            prefix = layer.name
            if layer.kind == "experts":
                modules[layer.name].update(weight_shape=list(layer.weight_shape), transposed=layer.view.transposed,
                                           per_matrix=layer.view.per_matrix)
                prefix += PACKED_SUFFIX
            if layer.tied_to is None:
                tensors[f"{prefix}.weight_packed"] = pack_bits(code_indices(layer.codes, table), index_bits(len(table)))
                tensors[f"{prefix}.weight_step"] = layer.step.to(layer.step_dtype)
            if layer.bias is not None:
                tensors[f"{layer.name}.bias"] = layer.bias
        # a Linear's or embedding's weight key first: plain transformers may rename an experts key on load
        stored = sorted((layer for layer in layers if layer.tied_to is None), key=lambda layer: layer.kind == "experts")
        guard = stored[0].name if stored[0].kind == "experts" else f"{stored[0].name}.weight"
        cfg = get_qat_config(model)
        quantization_config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "modules": modules,
                               "qat_config": cfg.to_dict() if cfg else {}, "guard": guard}
        overrides = {"tie_word_embeddings": False} if any(layer.tied_to for layer in layers) else {}
        files = write_model_config(model, out_dir, quantization_config, **overrides)
        files += save_tensors({**tensors, guard: guard_tensor()}, out_dir)
        return ExportInfo(format=self.name, path=out_dir, files=files, weight_bytes=tensor_bytes(tensors))
