"""export_checkpoint and load_exported: the entry points of hf_qat.export."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Any

import torch
from torch import nn

from ..config import CONFIG_NAME, QATConfig
from ..errors import QATModelError
from ..model.convert import get_qat_config, prepare_model_for_qat, quantized_weights, quantizer_units
from ..model.distributed import world_size
from ..model.unit import UNIT_KEY
from ..training.checkpoint import checkpoint_tensors
from ..version import __version__
from .base import (
    ExportFormat,
    ExportInfo,
    check_layers,
    choose_format,
    dedupe_shared,
    get_format,
    missing_for_loading,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from .layers import QuantizedLayer, collect_layers, probe_layers

logger = logging.getLogger("hf_qat")
PLAN_NAME = "qat_plan.json"


def load_qat_checkpoint(directory: str, **kwargs: Any) -> nn.Module:
    """A QAT model from a Trainer checkpoint or output dir (``qat_config.json`` + the model's weights):
    the model built from its config, QAT modules installed, every tensor (scales, switch state) loaded.

    A PEFT checkpoint (``adapter_config.json``: the base model named there + the adapter + the QAT state
    hf_qat saved beside it) loads as the PEFT model, merged (``merge_and_unload``) when it was trained with
    ``lora_mode="merged"``: that merge is exact, so the result exports as trained."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} does not exist (or is not a directory): pass a QAT model, or the "
                                f"checkpoint directory of a QAT run (it holds {CONFIG_NAME})")
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a checkpoint of a QAT run")
    config = QATConfig.from_pretrained(directory)
    if os.path.isfile(os.path.join(directory, "adapter_config.json")):
        return _load_peft_checkpoint(directory, config, **kwargs)
    with _units_expected(directory):
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    prepare_model_for_qat(model, config)
    # from_pretrained merged the per-expert tensors of MoE checkpoints into the fused experts; the units'
    # tensors come from the model's own weight files, their keys renamed back (checkpoint_tensors).
    state = checkpoint_tensors(model, directory)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied head's unit is its embedding's: its keys may be dropped as shared tensors
    owners = {id(w.weight_quantizer): n for n, w in quantizer_units(model)}
    sharers = tuple(w.unit_prefix for n, w in quantized_weights(model) if owners[id(w.weight_quantizer)] != n)
    qat_missing = [k for k in missing if UNIT_KEY in k and not k.startswith(sharers)]
    if qat_missing or unexpected:
        raise ValueError(f"{directory} does not match its {CONFIG_NAME}: missing {qat_missing[:3]}, unexpected {unexpected[:3]}")
    return model


@contextlib.contextmanager
def _units_expected(directory: str):
    """While the plain model loads a QAT checkpoint, its QAT units' tensors are expected extra keys (they
    are loaded into the units once installed, below): without this transformers reports each of them as
    UNEXPECTED in a LOAD REPORT before the export succeeds."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(directory))]
    except (KeyError, ValueError):  # a class transformers' mapping does not know: its report stays as it is
        yield
        return
    own = cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    cls._keys_to_ignore_on_load_unexpected = [*(cls._keys_to_ignore_on_load_unexpected or []), re.escape(UNIT_KEY)]
    try:
        yield
    finally:
        if own is None:
            del cls._keys_to_ignore_on_load_unexpected
        else:
            cls._keys_to_ignore_on_load_unexpected = own


def _load_peft_checkpoint(directory: str, config: QATConfig, **kwargs: Any) -> nn.Module:
    from ..training.qat_state import STATE_FILE, load_unit_state

    try:
        from peft import AutoPeftModelForCausalLM
    except ImportError:
        raise ImportError(f"{directory} is a PEFT checkpoint: pip install 'hf_qat[peft]' to load it") from None
    if not os.path.isfile(os.path.join(directory, STATE_FILE)):
        raise QATModelError(f"{directory} is a PEFT checkpoint without {STATE_FILE} (the QAT scales and switch state): "
                            "it was saved by hf_qat < 0.4 or without QATCallback, so its QAT model cannot be rebuilt")
    model = AutoPeftModelForCausalLM.from_pretrained(directory, **kwargs)
    prepare_model_for_qat(model, config)
    load_unit_state(model, directory)
    return model.merge_and_unload() if config.lora_mode == "merged" else model


def _expected_bytes(fmt: ExportFormat, layers: list[QuantizedLayer], others: dict[str, torch.Tensor]) -> int:
    total = sum(fmt.float_bytes(t) for t in dedupe_shared(others).values())
    for layer in layers:
        total += int(layer.codes.numel() * fmt.storage_bits(layer) / 8)
        total += fmt.scale_bytes(layer)
        total += 0 if layer.bias is None else fmt.float_bytes(layer.bias)
    return total


def export_checkpoint(
    model_or_dir: nn.Module | str | os.PathLike,
    out_dir: str | os.PathLike,
    format: str = "auto",
    tokenizer=None,
    push_to_hub: str | None = None,
    private: bool = True,
    token: str | None = None,
    card: dict[str, Any] | None = None,
    base_model: str | None = None,
    plan=None,
    format_options: dict[str, str] | None = None,
) -> ExportInfo:
    """Write a low-bit checkpoint of a QAT model (or of a QAT checkpoint directory).

    Args:
        model_or_dir: a model prepared by hf_qat (after the switch), or a checkpoint directory of a
            QAT run (it holds ``qat_config.json``).
        out_dir: the directory to write.
        format: "compressed-tensors" (transformers + vLLM), "gguf" (llama.cpp), "bitnet"
            (transformers BitNet), "hf-qat" (native: every grid but llama.cpp's blocks; needs hf_qat to load), or
            "auto". A format that cannot represent the model exactly is an error naming those that can.
        tokenizer: saved alongside (required for GGUF, which embeds it).
        plan: the run's :class:`hf_qat.planner.Plan` (``QATCallback.plan``) or its dict, for the
            model card and manifest; a checkpoint directory's ``qat_plan.json`` is read by default.
        push_to_hub: a repo id ("user/model") to upload the folder to in one commit.
        private / token: for the upload (token defaults to the environment / cached login).
        card: extra fields for the model card (``eval`` results, ``training_tokens``, ``description``).
        base_model: the model this was quantized from (for the card's ``base_model``).
        format_options: the format's own options, e.g. ``{"ternary_type": "TQ1_0"}`` for GGUF (ternary
            layers as TQ1_0, 1.69 bits per weight, instead of the default TQ2_0, 2.06 bits and faster);
            an option the format does not take is an error naming the ones it does.

    Under DDP/FSDP2 call it on every rank: the weights are gathered one at a time and only rank 0, which
    writes, keeps them (on the CPU); every rank returns rank 0's ExportInfo, or raises its error.
    """
    model = load_qat_checkpoint(os.fspath(model_or_dir)) if isinstance(model_or_dir, (str, os.PathLike)) else model_or_dir
    if isinstance(model_or_dir, (str, os.PathLike)) and base_model is None:
        base_model = getattr(model.config, "_name_or_path", None)
    writer = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    layers, others = collect_layers(model, keep=writer)  # every rank gathers; only the writer keeps
    out_dir = os.fspath(out_dir)

    def write() -> ExportInfo:
        name, passed_over = choose_format(layers) if format == "auto" else (format, [])
        fmt = get_format(name, format_options)
        check_layers(fmt, layers)
        fmt.check_model(model, layers, tokenizer)
        os.makedirs(out_dir, exist_ok=True)
        info = fmt.write(model, layers, others, out_dir, tokenizer=tokenizer)
        info.notes = passed_over + info.notes
        for note in passed_over:
            logger.warning("hf_qat: %s", note)
        info.expected_bytes = _expected_bytes(fmt, layers, others)
        if tokenizer is not None and name != "gguf":
            saved = [f for f in tokenizer.save_pretrained(out_dir) if os.path.isfile(f)]
            info.files += [os.path.relpath(os.path.abspath(f), os.path.abspath(out_dir)) for f in saved]
        cfg = get_qat_config(model)
        found_plan = _find_plan(model_or_dir, plan)
        from .card import write_model_card

        info.files.append(write_model_card(out_dir, fmt, info, cfg, found_plan, card or {}, base_model))
        write_manifest(out_dir, info, {"qat_config": cfg.to_dict() if cfg else None, "plan": found_plan,
                                       "hf_qat_version": __version__})
        if push_to_hub:
            from .hub import push_folder

            push_folder(out_dir, push_to_hub, private=private, token=token)
        return info

    return run_on_writer(write, writer)


def run_on_writer(task, writer: bool):
    """``task()`` on the writing rank, its result (or its error) on every rank: under several
    processes the others wait for it and raise a QATModelError with its message if it failed, so no
    rank is left waiting for one that raised."""
    if world_size() == 1:
        return task()
    box: list = [None]
    if writer:
        try:
            box[0] = ("ok", task())
        except Exception as exc:
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
            torch.distributed.broadcast_object_list(box, src=0)
            raise
    torch.distributed.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise QATModelError(f"the export failed on the writing rank: {value}")
    return value


def _find_plan(model_or_dir, plan) -> dict | None:
    """The plan for the model card: the one given (a Plan or its dict), else a checkpoint dir's qat_plan.json."""
    if plan is not None:
        return plan if isinstance(plan, dict) else plan.to_dict()
    if isinstance(model_or_dir, (str, os.PathLike)):
        path = os.path.join(os.fspath(model_or_dir), PLAN_NAME)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
    return None


def check_loadable(model: nn.Module, format: str = "auto") -> None:
    """For a model just prepared for QAT: raise now what exporting it in ``format`` and loading that with
    transformers would end in, so that a run that exports and reloads fails before it trains rather than after:
    QATModelError for a model not prepared, ValueError for an unknown format (ExportFormatError for one that
    cannot hold its layers), ImportError for a package the loader needs (auto: for the format it would get)."""
    if get_qat_config(model) is None:
        raise QATModelError("check_loadable: the model is not prepared for QAT (prepare_model_for_qat first)")
    if format == "auto":
        name = choose_format(probe_layers(model))[0]
    else:
        get_format(format).check_prepared(model)
        name = format
    if (missing := missing_for_loading(name)) is not None:
        raise missing


def load_exported(directory: str | os.PathLike, verify: bool = True, **kwargs: Any) -> nn.Module:
    """Load an export (any format) after checking every file against the manifest's sha256.

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (GGUF exports load through transformers'
    GGUF reader, which dequantizes).
    """
    from transformers import AutoModelForCausalLM

    directory = os.fspath(directory)
    manifest = read_manifest(directory)
    if (missing := missing_for_loading(manifest["format"])) is not None:
        raise missing
    if verify:
        manifest = verify_manifest(directory)
    if manifest["format"] == "gguf":
        gguf_file = next(f for f in manifest["files"] if f.endswith(".gguf"))
        return AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, **kwargs)
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs)
