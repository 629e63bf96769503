"""The pieces every export format shares: the format interface and registry, writing tensors and the
model config, and the manifest (``hf_qat_export.json``: format, QAT config, plan, and the sha256 of
every file, so that ``load_exported`` refuses a corrupt or modified checkpoint)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ExportFormatError, QATModelError
from ..export_formats import FORMATS
from .layers import QuantizedLayer, probe_layers

MANIFEST_NAME = "hf_qat_export.json"

@dataclass
class ExportInfo:
    """What an export wrote.

    Attributes:
        format: the format's name.
        path: the output directory.
        files: the files written (relative to ``path``).
        weight_bytes: bytes of all tensors written.
        expected_bytes: quantized weights at the format's storage bits + scales + other tensors (as the format
            stores them: GGUF writes every float tensor in F32, whatever the model's dtype).
        exact: whether the loaded model reproduces the QAT model exactly (up to matmul rounding).
        notes: what the user should know (e.g. activation quantization a loader does not replicate).
    """

    format: str
    path: str
    files: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    expected_bytes: int = 0
    exact: bool = True
    notes: list[str] = field(default_factory=list)


class ExportFormat:
    """One export format. Subclasses set ``name`` and implement :meth:`problem` and :meth:`write`."""

    name: ClassVar[str] = ""
    library_name: ClassVar[str] = "transformers"
    needs_hf_qat: ClassVar[bool] = False
    tags: ClassVar[tuple[str, ...]] = ()
    # format="auto" tries the formats in this order (None: never chosen automatically), each by auto_accepts, then,
    # when none accepts, takes the first that holds every layer exactly (choose_format)
    auto_priority: ClassVar[int | None] = None
    # the options a format takes (export_checkpoint(format_options=...)): name -> allowed values, the
    # first one the default
    OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Whether it writes llama.cpp's file types: format="auto" sends a model trained for one (gguf_mix) to
    # such a format only.
    writes_llama_cpp_files: ClassVar[bool] = False
    # The Python packages transformers needs to load what it writes (module names; hf_qat's `export` extra
    # installs them)
    load_requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: str) -> None:
        for key, value in options.items():
            if key not in self.OPTIONS:
                allowed = ", ".join(self.OPTIONS) or "none"
                raise ExportFormatError(f"format_options: {key!r} is not an option of format {self.name!r} "
                                        f"(its options: {allowed})")
            if value not in self.OPTIONS[key]:
                raise ExportFormatError(f"format_options[{key!r}]={value!r} is not allowed for format {self.name!r}; "
                                        f"allowed: {', '.join(self.OPTIONS[key])}")
        self.options = {key: options.get(key, allowed[0]) for key, allowed in self.OPTIONS.items()}

    def auto_accepts(self, layers: list[QuantizedLayer]) -> bool:
        """Whether format="auto" chooses this format for ``layers`` in its first pass (default: every layer exact
        here); :func:`choose_format` falls back to an exact format when none does."""
        return all(refusal(self, layer) is None for layer in layers)

    def problem(self, layer: QuantizedLayer) -> str | None:
        """Why ``layer`` cannot be written exactly in this format, or None if it can."""
        raise NotImplementedError

    def storage_bits(self, layer: QuantizedLayer) -> float:
        """Bits per weight this format stores for ``layer`` (for the size check)."""
        raise NotImplementedError

    def scale_bytes(self, layer: QuantizedLayer) -> int:
        """Bytes of the scales this format stores for ``layer`` (default: one step each, in its step dtype)."""
        return 0 if layer.tied_to else layer.step.numel() * layer.step_dtype.itemsize

    def check_target(self, model: nn.Module, layers: list[QuantizedLayer]) -> None:
        """Model-level requirements that hold before training (the architecture...): checked when
        ``QATConfig.export_format`` names this format; raise ExportFormatError."""

    def float_bytes(self, tensor: torch.Tensor) -> int:
        """Bytes this format stores for an unquantized tensor (norms, biases, a float embedding): default, as
        the model holds it."""
        return tensor.numel() * tensor.element_size()

    @classmethod
    def check_prepared(cls, model: nn.Module) -> None:
        """``QATConfig.export_format``: the QAT layers just installed in ``model``, checked against this format
        before training (as :func:`~hf_qat.export.layers.probe_layers` sees them), with the model-level
        requirements the format can check without a tokenizer (:meth:`check_target`)."""
        fmt = cls()
        layers = probe_layers(model)
        try:
            check_layers(fmt, layers)
            fmt.check_target(model, layers)
        except ExportFormatError as err:
            raise ExportFormatError(f"QATConfig.export_format={cls.name!r}: {err}") from None

    def check_model(self, model: nn.Module, layers: list[QuantizedLayer], tokenizer=None) -> None:
        """Model-level requirements (architecture, tokenizer...), checked before anything is written;
        raise ExportFormatError."""

    def write(self, model: nn.Module, layers: list[QuantizedLayer], others: dict[str, torch.Tensor], out_dir: str,
              tokenizer=None) -> ExportInfo:
        raise NotImplementedError


def choose_format(layers: list[QuantizedLayer]) -> tuple[str, list[str]]:
    """format="auto": the registered format of lowest ``auto_priority`` that accepts every layer (failing that, the
    first that holds every layer exactly: a Gemma embedding with embedding_bits, which only GGUF holds), and why
    each format tried before it did not (one reason each, for the export's notes)."""
    file_type = next((layer.gguf_mix for layer in layers if layer.gguf_mix), None)
    candidates = [cls() for cls in sorted((c for c in FORMATS.values() if c.auto_priority is not None),
                                          key=lambda c: c.auto_priority)
                  if file_type is None or cls.writes_llama_cpp_files]  # a file type: only a format that writes it
    skipped: dict[str, str] = {}  # format name -> why auto passed over it
    for fmt in candidates:
        if fmt.auto_accepts(layers):
            return fmt.name, list(skipped.values())
        reason = next((f"{layer.name}: {p}" for layer in layers if (p := refusal(fmt, layer)) is not None),
                      "not chosen automatically for these layers")
        skipped[fmt.name] = f"format='auto' passed over {fmt.name!r}: {reason}"
    exact = next((fmt for fmt in candidates if all(refusal(fmt, layer) is None for layer in layers)), None)
    if exact is not None:
        del skipped[exact.name]
        return exact.name, [*skipped.values(), f"format='auto' chose {exact.name!r}: the first format that holds every "
                                               "layer exactly"]
    raise ExportFormatError(f"no registered format accepts these layers ({'; '.join(skipped.values()) or 'none tried'}); "
                            f"formats: {', '.join(FORMATS)}")


def installed(module: str) -> bool:
    """Whether the Python package ``module`` can be imported here (without importing it)."""
    return importlib.util.find_spec(module) is not None


def missing_for_loading(name: str) -> ImportError | None:
    """The error that loading an export in format ``name`` with transformers would end in here, for a package it
    needs that is not installed (:attr:`ExportFormat.load_requires`), or None."""
    fmt = FORMATS.get(name)
    missing = [module for module in (fmt.load_requires if fmt else ()) if not installed(module)]
    if not missing:
        return None
    return ImportError(f"loading a {name} export with transformers needs the {', '.join(missing)} package "
                       f"(pip install 'hf_qat[export]')")


def get_format(name: str, options: dict[str, str] | None = None) -> ExportFormat:
    """The format ``name`` with its ``options`` (see ``ExportFormat.OPTIONS``; unknown ones are refused)."""
    if name not in FORMATS:
        raise ValueError(f"export format {name!r} is not known; formats: {', '.join(['auto', *FORMATS])}")
    return FORMATS[name](**(options or {}))


def formats_that_can(layers: list[QuantizedLayer]) -> list[str]:
    return [name for name, cls in FORMATS.items() if all(refusal(cls(), layer) is None for layer in layers)]


def refusal(fmt: ExportFormat, layer: QuantizedLayer) -> str | None:
    """Why ``fmt`` cannot write ``layer`` exactly, or None: the family's word first (a family only one format
    holds, :meth:`~hf_qat.quantizers.family.Quantizer.export_problem`), then the format's (:meth:`ExportFormat.problem`)."""
    return layer.family.export_problem(fmt.name) or fmt.problem(layer)


def other_formats(refusing: str, layers: list[QuantizedLayer]) -> str:
    """The advice of a format that refuses a model: the other formats that can write ``layers``, or what
    to train instead when none can (advice that works when followed)."""
    able = [name for name in formats_that_can(layers) if name != refusing]
    if able:
        return f"Formats that can: {', '.join(able)}"
    return (f"No other format can hold these layers exactly: train this model for another format, e.g. "
            f"QATConfig(bits=4, group_size=32, export_format='compressed-tensors') for compressed-tensors")


def check_layers(fmt: ExportFormat, layers: list[QuantizedLayer]) -> None:
    """Raise ExportFormatError naming each reason ``fmt`` cannot write some layers once (with the first such
    layer and how many more share it), and the formats that can."""
    problems: dict[str, list[str]] = {}
    for layer in layers:
        if (p := refusal(fmt, layer)) is not None:
            problems.setdefault(p, []).append(layer.name)
    if problems:
        shown = "; ".join(f"{names[0]}{f' and {len(names) - 1} more layers' if len(names) > 1 else ''}: {p}"
                          for p, names in problems.items())
        raise ExportFormatError(
            f"format {fmt.name!r} cannot represent this model exactly: {shown}. {other_formats(fmt.name, layers)}")


# ---------------------------------------------------------------------------------------- writing
def dedupe_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later keys whose tensor shares storage with an earlier one (tied weights: written once)."""
    seen: set[tuple[int, int, tuple]] = set()
    out = {}
    for key, tensor in tensors.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident in seen and tensor.numel():
            continue
        seen.add(ident)
        out[key] = tensor.contiguous()
    return out


def save_tensors(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_size: str | int = "4GB") -> list[str]:
    """Write safetensors (sharded with an index when large); returns the file names."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    tensors = dedupe_shared(tensors)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    files = []
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(out_dir, filename), metadata={"format": "pt"})
        files.append(filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
        files.append("model.safetensors.index.json")
    return files


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in dedupe_shared(tensors).values())


def write_model_config(model: nn.Module, out_dir: str, quantization_config: dict[str, Any] | None,
                       **overrides: Any) -> list[str]:
    """config.json (with ``quantization_config``) and generation_config.json of ``model``."""
    config = getattr(model, "config", None)
    if config is None:
        raise QATModelError("export needs a transformers model (with a .config)")
    config = config.__class__.from_dict(config.to_dict())
    # Record the dtype: without it transformers' dtype="auto" takes the first floating tensor of the
    # checkpoint, which may be an fp16 scale.
    config.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for key, value in overrides.items():
        setattr(config, key, value)
    if quantization_config is None:
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    else:
        config.quantization_config = quantization_config
    config.save_pretrained(out_dir)
    files = ["config.json"]
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out_dir)
        files.append("generation_config.json")
    return files


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------- manifest
def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(out_dir: str, info: ExportInfo, extra: dict[str, Any]) -> str:
    files = {}
    for name in sorted(set(info.files)):
        path = os.path.join(out_dir, name)
        files[name] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    data = {"format": info.format, "exact": info.exact, "notes": info.notes, "weight_bytes": info.weight_bytes,
            "expected_bytes": info.expected_bytes, "files": files, **extra}
    path = os.path.join(out_dir, MANIFEST_NAME)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    return path


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {MANIFEST_NAME}: it was not written by hf_qat export_checkpoint")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def verify_manifest(directory: str) -> dict[str, Any]:
    """Check every file the manifest lists against its sha256; raise a clear error otherwise."""
    manifest = read_manifest(directory)
    for name, meta in manifest["files"].items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise ValueError(f"exported checkpoint {directory} is incomplete: {name} is missing")
        size = os.path.getsize(file)
        if size != meta["bytes"]:
            raise ValueError(f"exported checkpoint {directory} is corrupt: {name} has {size} bytes, the export wrote "
                             f"{meta['bytes']} (truncated or modified)")
        if sha256_file(file) != meta["sha256"]:
            raise ValueError(f"exported checkpoint {directory} is corrupt: {name} does not match the sha256 the export "
                             "recorded (modified after export)")
    return manifest
