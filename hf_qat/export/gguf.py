"""GGUF for llama.cpp: blocks written from the QAT integers (never re-quantized).

Each quantized layer is written as the GGML block type its family names (``Quantizer.gguf_type``), packed by
the family (``Quantizer.pack_gguf``; the layouts are :mod:`hf_qat.quantizers.ggml_blocks`): Q4_0 / Q5_0 / Q8_0
for 4-, 5- and 8-bit integer grids in groups of 32 with fp16 scales, TQ2_0 (or TQ1_0, ``format_options=
{"ternary_type": "TQ1_0"}``: 1.69 instead of 2.06 bits) for ternary groups of 256, the ggml families' own types
(Q2_K .. Q6_K, IQ4_NL, IQ4_XS, Q4_1, Q5_1, Q1_0), MXFP4 and NVFP4 for the FP4 families. NVFP4's per-tensor scale
``1 / g`` (a power of two, exact) is the F32 tensor ``<name>.scale`` that llama.cpp multiplies into the matmul's
output (``{n_expert}`` for an expert stack) in the graphs that read it (llama, mistral, qwen3, mixtral, qwen3_moe;
refused for the others: ``GGUFArchitecture.nvfp4_scales``): exact for the NVFP4 family, except the token
embedding (llama.cpp has no scale for it, nor for a tied output) and MLP layers with a bias (llama.cpp's FFN
asserts against a scale with a bias).

The file is runnable by llama.cpp: llama.cpp tensor names (gguf's TensorNameMap), the per-architecture
metadata and tensor transforms (:mod:`hf_qat.llamacpp.architectures`: the Llama q/k row permutation moves
rows with their group scales; Gemma's norms become ``1 + w``) and the tokenizer
(:mod:`hf_qat.llamacpp.vocab`). Norms and unquantized weights are F32.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from ..errors import ExportFormatError, MissingTokenizerError, QATConfigError
from ..export_formats import register_format
from ..llamacpp.architectures import GGUFArchitecture, add_metadata, architecture
from ..llamacpp.file_types import DEFAULT_TYPE
from ..llamacpp.tensors import expert_tensor_names, skips_head
from ..llamacpp.vocab import add_tokenizer, gguf_vocab
from .base import ExportFormat, ExportInfo, other_formats, tensor_bytes, write_model_config
from ..quantizers import available_quantizers, get_quantizer_class
from ..quantizers.ggml_blocks import SCALE_BYTES
from .layers import QuantizedLayer

TQ1_0, TQ2_0, NVFP4 = "TQ1_0", "TQ2_0", "NVFP4"
TERNARY_TYPES = (TQ2_0, TQ1_0)
logger = logging.getLogger("hf_qat")


def gguf_type(layer: QuantizedLayer, ternary_type: str = TQ2_0) -> str | None:
    """The GGML block type that stores ``layer`` exactly (ternary layers: ``ternary_type``), or None: the
    family's word (:meth:`~hf_qat.quantizers.family.Quantizer.gguf_type`)."""
    return layer.family.gguf_type(layer.group_size, layer.scale_dtype, ternary_type)


def block_size(qtype: str) -> tuple[int, int]:
    """``(weights, bytes)`` of one block of the GGML type ``qtype`` (gguf-py's table, ggml's own)."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]


def _scale_bytes(layer: QuantizedLayer, qtype: str) -> int:
    """The bytes of one block of ``layer`` (type ``qtype``) that hold scales, not codes."""
    if qtype in SCALE_BYTES:
        return SCALE_BYTES[qtype]
    block, size = block_size(qtype)
    return size - int(layer.family.bits) * block // 8


def nvfp4_tensor_scale(layer: QuantizedLayer, step: torch.Tensor) -> float:
    """The ``<name>.scale`` llama.cpp multiplies into an NVFP4 matmul: ``1 / g`` of these steps of ``layer``."""
    return float(1.0 / layer.family.stored_scales(step)[1])


def _pack_layer(layer: QuantizedLayer, codes: torch.Tensor, step: torch.Tensor, qtype: str,
                heads: int | None = None) -> np.ndarray:
    """The raw blocks of a layer's matrix ``codes [R, C]`` (rows of ``layer.codes``: ``heads`` permutes them,
    with the steps or the ggml families' block scales, as llama.cpp orders q/k rows)."""
    if heads:
        codes, step = _permute_qk(codes, heads), _permute_qk(step, heads)
    scales = layer.ggml_scales.map(lambda t: _permute_qk(t, heads)) if heads and layer.ggml_scales else layer.ggml_scales
    return layer.family.pack_gguf(codes, step, scales, qtype)


def _permute_qk(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for Llama q/k projections (a row permutation)."""
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


@register_format
class GGUFFormat(ExportFormat):
    name = "gguf"
    library_name = "gguf"
    tags = ("gguf", "llama.cpp")
    load_requires = ("gguf",)  # transformers' GGUF reader

    OPTIONS = {"ternary_type": TERNARY_TYPES}
    auto_priority = 2  # the ggml families and file types (auto_accepts); the others load in transformers first
    writes_llama_cpp_files = True

    def qtype(self, layer: QuantizedLayer) -> str | None:
        """The layer's block type; ternary layers: the file type's (tq1_0 / tq2_0), else the ternary_type option."""
        file_type = DEFAULT_TYPE.get(layer.gguf_mix)
        return gguf_type(layer, file_type if file_type in TERNARY_TYPES else self.options["ternary_type"])

    def auto_accepts(self, layers: list[QuantizedLayer]) -> bool:
        """The ggml families, and any model trained for a llama.cpp file type (``gguf_mix``), every layer exact."""
        return (any(layer.family.export_formats == (self.name,) or layer.gguf_mix is not None for layer in layers)
                and super().auto_accepts(layers))

    def problem(self, layer: QuantizedLayer) -> str | None:
        qtype = self.qtype(layer)
        if qtype is None:
            families = "; ".join(f"{name}: {', '.join(f'{t} ({b}-bit, {g} a block)' for t, (b, g) in types.items())}"
                                 for name in available_quantizers()
                                 if (types := get_quantizer_class(name).llama_cpp_types))
            return (f"GGUF holds the GGML types these families train ({families}; lsq and seq with fp16 scales) and "
                    "NVFP4 (blocks of 16 under E4M3 scales)")
        if layer.activation_bits:
            return "llama.cpp does not fake-quantize activations as int8 per token"
        if qtype == NVFP4:
            return _nvfp4_problem(layer)
        return None

    def storage_bits(self, layer: QuantizedLayer) -> float:
        if layer.tied_to:
            return 0.0  # llama.cpp reads a tied output from token_embd
        qtype = self.qtype(layer)
        block, size = block_size(qtype)
        return 8.0 * (size - _scale_bytes(layer, qtype)) / block  # the block scales are counted apart

    def scale_bytes(self, layer: QuantizedLayer) -> int:
        if layer.tied_to:
            return 0
        qtype = self.qtype(layer)
        blocks = layer.codes.numel() // block_size(qtype)[0]
        tensor_scales = 4 * (layer.weight_shape[0] if layer.kind == "experts" else 1) if qtype == NVFP4 else 0
        return blocks * _scale_bytes(layer, qtype) + tensor_scales

    def float_bytes(self, tensor) -> int:
        return tensor.numel() * 4  # every float tensor is written F32

    def check_target(self, model, layers) -> None:
        try:
            architecture(model.config)
        except ExportFormatError as exc:
            raise ExportFormatError(f"{exc} {other_formats(self.name, layers)}") from None

    def check_model(self, model, layers, tokenizer=None) -> None:
        try:
            arch = architecture(model.config)
        except ExportFormatError as exc:
            raise ExportFormatError(f"{exc} {other_formats(self.name, layers)}") from None
        scaled = [layer.name for layer in layers if self.qtype(layer) == NVFP4 and not layer.tied_to]
        if scaled and not arch.nvfp4_scales:
            raise ExportFormatError(
                f"llama.cpp's {model.config.model_type} graph does not multiply in the per-tensor scale of NVFP4 "
                f"weights ({scaled[0]}, ...: it would compute with weights g times too large). "
                f"{other_formats(self.name, layers)} (or train MXFP4 for GGUF)")
        _vocab(tokenizer, model.config)

    def write(self, model, layers, others, out_dir, tokenizer=None) -> ExportInfo:
        import gguf

        cfg = model.config
        arch = architecture(cfg)
        path = os.path.join(out_dir, "model.gguf")
        writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
        add_metadata(writer, cfg, arch)
        file_type = _file_type(model, layers, self.qtype)
        if file_type is not None:
            writer.add_file_type(file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, _vocab(tokenizer, cfg))
        written = _add_tensors(writer, cfg, arch, layers, others, self.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        files = write_model_config(model, out_dir, None)
        notes = ["NVFP4 tensors carry their per-tensor scale as <name>.scale, which llama.cpp reads and transformers' "
                 "GGUF loader (5.24) cannot: load this file with llama.cpp"] if any(
            self.qtype(layer) == NVFP4 for layer in layers) else []
        leftover = float_leftovers(path, model, layers, self.qtype)
        if leftover:
            notes.append(leftover)
            logger.warning("hf_qat: %s", leftover)
        low = sorted({str(layer.dtype).removeprefix("torch.") for layer in layers if layer.dtype != torch.float32})
        if low:
            notes.append(
                f"the model computes in {', '.join(low)}: the file holds each weight as ggml dequantizes it, in float32, "
                f"which the QAT forward computed too and then rounded once to {', '.join(low)}. Read back in "
                f"{', '.join(low)} the file gives the QAT weights bit for bit; llama.cpp computes with the float32 "
                "values (at most half a unit in the last place apart)")
        narrow = sorted({str(t.dtype).replace("torch.", "") for t in others.values()
                         if t.is_floating_point() and t.element_size() < 4})
        if narrow:
            notes.append(f"the unquantized tensors (norms, float embeddings, biases) are written F32, wider than the "
                         f"model's {', '.join(narrow)}: the file is larger than the model's own tensors, not inexact")
        return ExportInfo(format=self.name, path=out_dir, files=["model.gguf", *files], weight_bytes=tensor_bytes(written),
                          notes=notes)


def float_leftovers(path: str, model, layers: list[QuantizedLayer], qtype_of) -> str | None:
    """What the GGUF at ``path`` writes in float that llama.cpp's quantizer would quantize, its bytes against
    llama.cpp's file of the nearest type, and the preset that trains that file; None for a model trained for a
    file type (``gguf_mix``) or with nothing left in float."""
    import gguf

    from ..model.convert import get_qat_config
    from ..llamacpp.file_types import allows_quantization, file_type_of, mix_tensor_types
    from ..llamacpp.tensors import gguf_tensors

    config = get_qat_config(model)
    if config is None or config.gguf_mix is not None:
        return None
    tensors = [(t.name, tuple(int(n) for n in t.shape), t.tensor_type, int(t.n_bytes))
               for t in gguf.GGUFReader(path).tensors]
    floats = [(name, size) for name, shape, kind, size in tensors
              if kind.name in ("F32", "F16", "BF16") and allows_quantization(name, shape)]
    if not floats:
        return None
    mb = sum(size for _, size in floats) / 1e6
    note = (f"{len(floats)} weight tensor(s) written in float, {mb:.1f} MB of the file's "
            f"{sum(t[3] for t in tensors) / 1e6:.1f} MB ({', '.join(name for name, _ in floats[:3])}"
            f"{', ...' if len(floats) > 3 else ''})")
    weights: dict[str, int] = {}
    for layer in layers:
        weights[qtype_of(layer)] = weights.get(qtype_of(layer), 0) + layer.codes.numel()
    main = max(weights, key=weights.get) if weights else None
    file_type = file_type_of(main) if main else None
    if file_type is None:
        return note + "; no llama.cpp file type has these layers' type"
    try:
        types = mix_tensor_types(file_type, gguf_tensors(model, [])[0], [(name, shape) for name, shape, _, _ in tensors])
    except QATConfigError as refused:  # llama.cpp's quantizer stops on this model at that file type
        return f"{note}; llama.cpp's quantizer cannot write a {file_type.upper()} file of this model ({refused.detail})"
    sizes = gguf.GGML_QUANT_SIZES
    llama_bytes = sum(int(np.prod(shape)) // sizes[gguf.GGMLQuantizationType[types[name]]][0]
                      * sizes[gguf.GGMLQuantizationType[types[name]]][1] for name, shape, _, _ in tensors)
    return (f"{note}: llama.cpp's {file_type.upper()} file of this model is {llama_bytes / 1e6:.1f} MB. "
            f"QATConfig.from_preset({file_type!r}) trains that file, tensor by tensor")


def _file_type(model, layers: list[QuantizedLayer], qtype_of) -> int | None:
    """``general.file_type`` as llama-quantize writes it: the mix (``gguf_mix``), else the type holding most of
    the quantized weights when llama.cpp names a file type after it, F32 for a float model; None otherwise."""
    import gguf

    from ..model.convert import get_qat_config

    config = get_qat_config(model)
    if config is not None and config.gguf_mix is not None:
        return gguf.LlamaFileType[f"MOSTLY_{config.gguf_mix.upper()}"]
    if not layers:
        return gguf.LlamaFileType.ALL_F32
    weights: dict[str, int] = {}
    for layer in layers:
        weights[qtype_of(layer)] = weights.get(qtype_of(layer), 0) + layer.codes.numel()
    return getattr(gguf.LlamaFileType, f"MOSTLY_{max(weights, key=weights.get)}", None)


def export_float_gguf(model, out_dir: str, tokenizer) -> str:
    """``model`` as it computes now (not prepared for QAT), every tensor in F32, as ``<out_dir>/model.gguf``:
    the input llama.cpp's own quantizer expects (``llama-quantize`` / ``llama_cpp.llama_model_quantize``), for
    comparing it with QAT on the same file layout. Returns the file's path."""
    if any(value.ndim == 3 for value in model.state_dict().values()):
        raise ExportFormatError("export_float_gguf writes dense models only (fused expert stacks are written by the "
                                "quantized GGUF export)")
    os.makedirs(out_dir, exist_ok=True)
    fmt = GGUFFormat()
    fmt.check_model(model, [], tokenizer)
    fmt.write(model, [], {key: value.detach().cpu() for key, value in model.state_dict().items()}, out_dir, tokenizer)
    return os.path.join(out_dir, "model.gguf")


def _nvfp4_problem(layer: QuantizedLayer) -> str | None:
    """Why llama.cpp cannot compute ``layer`` (an NVFP4 layer) from an NVFP4 tensor exactly, or None."""
    if layer.kind == "embedding" or layer.tied_to is not None:
        return ("llama.cpp multiplies an NVFP4 tensor's per-tensor scale (<name>.scale) into matmul outputs only: the "
                "token embedding has none, and a tied output may not have one (quantize the embedding with "
                "embedding_method='lsq' (Q4_0 / Q8_0 blocks), or export format='hf-qat')")
    if layer.shape[1] % block_size(NVFP4)[0]:
        return (f"GGUF's NVFP4 blocks hold {block_size(NVFP4)[0]} weights (four blocks of 16) along the input; this input "
                f"width is {layer.shape[1]}")
    if layer.bias is not None and ".mlp." in layer.name:
        return "llama.cpp's FFN refuses an NVFP4 per-tensor scale together with a bias (it would apply after the bias)"
    return None


def _vocab(tokenizer, cfg):
    if tokenizer is None:
        raise MissingTokenizerError("GGUF embeds the tokenizer: pass export_checkpoint(..., tokenizer=...)")
    return gguf_vocab(tokenizer, cfg.vocab_size)


def _qk_heads(cfg, key: str) -> int | None:
    """The head count whose rotary halves llama.cpp interleaves for q/k projections (None otherwise)."""
    if key.endswith(("q_proj.weight", "q_proj")):
        return cfg.num_attention_heads
    if key.endswith(("k_proj.weight", "k_proj")):
        return cfg.num_key_value_heads
    return None


def _expert_tensors(layer: QuantizedLayer, qtype: str) -> list[tuple[str, np.ndarray]]:
    """A fused expert stack as llama.cpp's stacked tensors, raw blocks ``[E, rows, bytes]`` (gguf reads
    them as ``{in, rows, E}``): ``gate_up_proj``'s two halves (gate first: transformers' concatenated
    layout) as ``ffn_gate_exps`` and ``ffn_up_exps``, ``down_proj`` as ``ffn_down_exps``."""
    codes, step = layer.expert_codes_and_steps()  # [E, out, in], [E, out, groups]: each expert a Linear
    experts, out, width = codes.shape
    raw = _pack_layer(layer, codes.reshape(experts * out, width), step.reshape(experts * out, -1), qtype)
    raw = raw.reshape(experts, out, -1)
    tensor_scale = np.full(experts, nvfp4_tensor_scale(layer, step), dtype=np.float32) if qtype == NVFP4 else None
    names = expert_tensor_names(layer.name)
    if not names:
        raise ExportFormatError(f"{layer.name}: no llama.cpp tensor for the expert weight {layer.name.rsplit('.', 1)[-1]!r}")
    rows = out // len(names)  # one block of rows per projection, in the stack's order (gate_up_proj: gate, up)
    tensors = [(name, np.ascontiguousarray(raw[:, i * rows:(i + 1) * rows])) for i, name in enumerate(names)]
    if tensor_scale is not None:  # one scale per expert ({n_expert}), the same for all: one g per stack
        tensors += [(key.removesuffix(".weight") + ".scale", tensor_scale) for key, _ in tensors]
    return tensors


def _add_tensors(writer, cfg, arch: GGUFArchitecture, layers, others, qtype_of) -> dict[str, torch.Tensor]:
    """The quantized layers as GGUF blocks (of type ``qtype_of(layer)``) of their QAT integers, the other
    tensors (biases, norms, unquantized weights) in fp32; returns what was written (for the byte count)."""
    import gguf

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), cfg.num_hidden_layers)

    def qk_heads(key: str) -> int | None:
        return _qk_heads(cfg, key) if arch.permute_qk else None

    def gguf_name(key: str) -> str:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportFormatError(f"no llama.cpp name for {key}")
        return name

    written: dict[str, torch.Tensor] = {}
    for layer in layers:
        if skips_head(arch, layer.tied_to is not None):
            continue
        if layer.kind == "experts":
            for name, raw in _expert_tensors(layer, qtype_of(layer)):
                quantized = raw.dtype == np.uint8
                writer.add_tensor(name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype_of(layer)) if quantized
                                  else None)
                written[name] = torch.from_numpy(raw)
            continue
        heads = qk_heads(layer.name)
        qtype = qtype_of(layer)
        raw = _pack_layer(layer, layer.codes, layer.step, qtype, heads)
        name = gguf_name(f"{layer.name}.weight")
        writer.add_tensor(name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
        written[layer.name] = torch.from_numpy(raw)
        if qtype == NVFP4:
            scale = np.array([nvfp4_tensor_scale(layer, layer.step)], dtype=np.float32)
            writer.add_tensor(name.removesuffix(".weight") + ".scale", scale)
            written[f"{layer.name}.scale"] = torch.from_numpy(scale)
        if layer.bias is not None:
            bias = layer.bias.float()
            writer.add_tensor(gguf_name(f"{layer.name}.bias"), (_permute_qk(bias, heads) if heads else bias).numpy())
            written[f"{layer.name}.bias"] = bias
    for key, tensor in others.items():
        if key == "lm_head.weight" and skips_head(arch, getattr(cfg, "tie_word_embeddings", False) or (
                "model.embed_tokens.weight" in others
                and tensor.data_ptr() == others["model.embed_tokens.weight"].data_ptr())):
            continue
        t = tensor.float()
        heads = qk_heads(key)
        if heads:
            t = _permute_qk(t, heads)
        if arch.norm_shift and key.endswith("norm.weight"):
            t = t + arch.norm_shift
        writer.add_tensor(gguf_name(key), t.numpy())
        written[key] = t
    for name, t in arch.extra_tensors(cfg).items():
        writer.add_tensor(name, t.numpy())
        written[name] = t
    return written
