"""Install QAT units into a model, switch them on, initialise scales, take them out; PTQ.

``prepare_model_for_qat(model, config)`` is one pass a reader can follow:

1. a loaded low-bit checkpoint becomes trainable layers again (the restorers that formats register,
   e.g. the native format's: preparing a model never imports the exporter);
2. find the weights (:mod:`hf_qat.model.targets`: Linear layers, fused MoE experts, the embedding and LM head
   with ``embedding_bits``); a floating weight no rule covers is an error, never silently FP;
3. make ONE :class:`~hf_qat.model.unit.WeightQuantizer` per weight (a tied LM head shares its embedding's);
4. attach: QATLinear / QATEmbedding replace their layers (holding the same Parameters), fused experts
   compute through their units in place (:mod:`hf_qat.model.experts`);
5. log one line of coverage (:func:`hf_qat.model.coverage.coverage`).

It must run before the model is wrapped (DDP / FSDP2) and before the optimizer is built:
``QATCallback`` calls it from ``on_init_end``. The units are dormant: the model computes exactly what it
computed before until :func:`set_qat_active` and :func:`initialize_scales`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import QATConfig
from ..errors import QATConfigError, QATModelError
from ..export_formats import check_target
from ..quantizers import get_quantizer
from . import experts
from .coverage import Coverage, coverage
from .experts import QATExperts
from .file_type import WeightFamily, mix_families
from .lora import attach_lora, detach_lora, refuse_expert_adapters, weight_deltas
from .modules import QATEmbedding, QATLinear
from .targets import WeightTarget, find_targets, name_matches, select_targets
from .unit import WeightQuantizer
from .weights import (QuantizedWeight, get_qat_config, qat_modules, quantized_weights, quantizer_units,
                      require_qat_modules)

logger = logging.getLogger("hf_qat")
PROGRESS_DELAY = 5.0  # seconds: scale initialisation that ends sooner shows no progress bar

__all__ = [
    "Coverage", "QuantizedWeight", "RESTORERS", "activate_qat", "coverage", "find_targets", "get_qat_config",
    "initialize_scales", "is_qat_active", "make_units", "name_matches", "prepare_model_for_qat", "ptq",
    "qat_modules", "quantization_error", "quantized_weights", "quantizer_units", "register_restorer", "remove_qat",
    "set_qat_active",
]

# Restorers turn a loaded low-bit model back into trainable layers before install: ``restorer(model)``
# returns ``(the QATConfig dict it was trained with, steps by weight name)``, or None when the model
# holds none of its layers. Formats register theirs (hf_qat.export.packed_modules does on import).
Restorer = Callable[[nn.Module], "tuple[dict, dict[str, torch.Tensor]] | None"]
RESTORERS: list[Restorer] = []


def register_restorer(restorer: Restorer) -> Restorer:
    """Add ``restorer`` to :data:`RESTORERS` (once)."""
    if restorer not in RESTORERS:
        RESTORERS.append(restorer)
    return restorer


# ---------------------------------------------------------------------------------------- install
def prepare_model_for_qat(model: nn.Module, config: QATConfig | dict) -> nn.Module:
    """Install dormant QAT units into ``model`` in place (and return it); see the module docstring.

    Call before the model is wrapped for DDP/FSDP2 and before the optimizer is created (QATCallback
    does it in ``on_init_end``). Preparing twice with the same config is a no-op.
    """
    config = QATConfig.from_dict(config) if isinstance(config, dict) else config
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a QATConfig or a dict, got {type(config).__name__}")
    refuse_expert_adapters(model)
    restored = None
    for restore in RESTORERS:
        restored = restore(model) or restored
    existing = get_qat_config(model)
    if existing is not None or any(True for _ in qat_modules(model)):
        here, there = config.to_dict(), ({} if existing is None else existing.to_dict())
        if here == there:
            attach_lora(model, config.lora_mode)
            return model
        listed = "".join(f"; {name}: {there.get(name)!r} there, {value!r} here" for name, value in here.items()
                         if there and value != there.get(name))
        same = " Pass the config it was prepared with (hf_qat.get_qat_config(model)), or" if there else ""
        raise QATModelError(f"the model already holds QAT modules prepared with another config{listed}.{same} "
                            "call hf_qat.remove_qat(model) first")

    targets = select_targets(model, config)
    families = None
    if config.gguf_mix is not None:
        families = mix_families(model, [name for name, t in targets.items() if t.tied_to is None], config.gguf_mix)
        kept_float = [name for name, family in families.items() if family is None]
        if kept_float:  # rows not a multiple of 32: llama.cpp writes them F16, hf_qat's GGUF writes F32
            logger.warning("hf_qat: llama.cpp's %s keeps %s in float (F16 in its file, F32 in hf_qat's GGUF): so does "
                           "QAT", config.gguf_mix, ", ".join(kept_float))
        targets = {name: t for name, t in targets.items() if families.get(t.tied_to or name) is not None}
        if not targets:
            raise QATModelError(
                f"llama.cpp's {config.gguf_mix} keeps every weight of this model in float (no input width is a "
                "multiple of 32, ggml's smallest block), so there is nothing for QAT to train. Train a model whose "
                "widths are multiples of 32 (256 for the k-quants), or another method without gguf_mix")
    if not targets:
        raise QATModelError("QATConfig selects no weight to quantize (target_modules / exclude_modules leave nothing): "
                            "QAT would be full-precision training")
    units = make_units(targets, config, families)
    _attach(model, targets, units, config)
    attach_lora(model, config.lora_mode)
    if restored is not None and restored[0] == config.to_dict():
        _resume_from_steps(units, restored[1])
    logger.info("hf_qat: %d weights prepared for QAT (%s); %s", len({id(u) for u in units.values()}),
                config.resolved_method, coverage(model))
    if config.export_format is not None:
        check_target(model, config.export_format)
    return model


def make_units(targets: dict[str, WeightTarget], config: QATConfig,
               families: dict[str, WeightFamily | None] | None = None) -> dict[str, WeightQuantizer]:
    """One unit per target weight, by weight name (a head tied to the embedding gets the embedding's);
    ``families``: each weight's own family (a ``gguf_mix``, :func:`hf_qat.model.file_type.mix_families`)."""
    main = get_quantizer(config.resolved_method, config.bits)
    embedding = get_quantizer(config.resolved_embedding_method, config.embedding_bits) if config.embedding_bits else None
    units: dict[str, WeightQuantizer] = {}
    for name, target in targets.items():
        if target.tied_to is not None:
            continue
        quantizer, group_size = (embedding if target.embedding else main), config.group_size
        if families is not None:
            family = families[name]
            quantizer, group_size = get_quantizer(family.method, family.bits), family.group_size
        unit = WeightQuantizer(
            quantizer, getattr(target.module, target.parameter),
            group_size=group_size, scale_dtype=config.resolved_scale_dtype(getattr(target.module, target.parameter).dtype),
            scale_grad_mode=config.scale_grad_mode,
            scale_init=config.scale_init, name=name, transposed=target.transposed,
        )
        unit.config = config
        units[name] = unit
    for name, target in targets.items():
        if target.tied_to is not None:
            units[name] = units[target.tied_to]
    return units


def _attach(model: nn.Module, targets: dict[str, WeightTarget], units: dict[str, WeightQuantizer],
            config: QATConfig) -> None:
    """QATLinear / QATEmbedding in place of their layers; units onto the fused experts modules."""
    replacements: dict[int, nn.Module] = {}
    experts_units: dict[int, tuple[nn.Module, dict[str, WeightQuantizer]]] = {}
    for name, target in targets.items():
        if target.kind == "experts":
            if config.activation_bits is not None:
                raise QATModelError(
                    f"{name}: activation_bits is not supported on fused MoE experts (their inner activations are "
                    "computed inside transformers' experts forward); leave activation_bits unset or exclude the "
                    f"experts with exclude_modules=[{target.module_name!r}]"
                )
            experts_units.setdefault(id(target.module), (target.module, {}))[1][target.parameter] = units[name]
        elif target.kind == "embedding":
            replacements[id(target.module)] = QATEmbedding.from_embedding(target.module, units[name])
        else:
            replacements[id(target.module)] = QATLinear.from_linear(
                target.module, units[name], activation_bits=None if target.embedding else config.activation_bits)
    _replace_modules(model, replacements)
    for module, module_units in experts_units.values():
        experts.install(module, module_units)


def _replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put each new module wherever the old one is referenced (a module may have several parents)."""
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]


def _resume_from_steps(units: dict[str, WeightQuantizer], steps: dict[str, torch.Tensor]) -> None:
    """A native checkpoint re-prepared with the config it was trained with continues its QAT: scales
    from the stored steps (s = step / level) and QAT on (``units`` by weight name, as :func:`make_units`: a
    tied head's is its embedding's, taken once)."""
    for unit in {id(unit): unit for unit in units.values()}.values():
        step = steps.get(unit.name)
        if step is not None and unit.log_scale_ratio is not None:
            unit.set_scale(step.float() / unit.spec.grid.level)
        unit.set_active(True)
        unit.mark_initialized()


# ---------------------------------------------------------------------------------------- state
def set_qat_active(model: nn.Module, active: bool = True) -> int:
    """Switch every QAT unit on (or off); returns how many there are (QATModelError if none)."""
    require_qat_modules(model, "set_qat_active")
    count = 0
    for _, weight in quantizer_units(model):
        weight.weight_quantizer.set_active(active)
        count += 1
    return count


def is_qat_active(model: nn.Module) -> bool:
    return any(weight.is_qat_active for _, weight in quantized_weights(model))


def initialize_scales(model: nn.Module, force: bool = False) -> int:
    """Initialise every unit's scale from its full weight (with PEFT's merged LoRA delta); returns
    how many were initialised.

    Under FSDP2 this all-gathers each weight, so call it on every rank (QATCallback does, at the
    switch). Raises QATRuntimeError if a weight holds NaN/Inf.
    """
    require_qat_modules(model, "initialize_scales")
    deltas = weight_deltas(model)
    todo = [weight for _, weight in quantizer_units(model) if force or not weight.weight_quantizer.is_initialized]
    # scale_init="mse" took 0.7 s (int4 g32) to 1.6 s (Q4_K) per 2048 x 2048 matrix on one CPU thread: minutes
    # for a large model, so a bar once the work runs past PROGRESS_DELAY seconds
    quiet = os.environ.get("RANK", "0") != "0" or not logger.isEnabledFor(logging.INFO)
    for weight in tqdm(todo, desc="hf_qat: initialising the scales", unit="weight", delay=PROGRESS_DELAY, disable=quiet):
        weight.weight_quantizer.initialize(weight.full_weight(deltas.get(id(weight.module))).detach())
    return len(todo)


def activate_qat(model: nn.Module) -> None:
    """Switch QAT on and initialise the scales that are not yet (what the callback does at the switch)."""
    require_qat_modules(model, "activate_qat")
    set_qat_active(model, True)
    initialize_scales(model)


def ptq(model: nn.Module, config: QATConfig | dict, calibration=None) -> nn.Module:
    """One-shot round-to-nearest post-training quantization on the same grids (the PTQ baseline).

    Installs the QAT units (if needed), activates them and initialises every scale with the
    family's rule (max|w| / Qp for LSQ, max|w| for SEQ, mean|w| for binary; ``scale_init="mse"``: the clipping
    of least error), without training. The model then computes with the quantized weights and can be exported
    like a QAT model. ``calibration``: batches for an importance matrix (:mod:`hf_qat.model.importance`, llama.cpp's
    imatrix) that weights the mse search by each input column's mean squared activation.
    """
    config = QATConfig.from_dict(config) if isinstance(config, dict) else config
    if calibration is not None and config.scale_init != "mse":
        raise QATConfigError("scale_init", config.scale_init, "'mse' with ptq(..., calibration=...)",
                             detail="the importance matrix weights the mse clipping search; the 'max' rule takes no data")
    prepare_model_for_qat(model, config)
    if calibration is not None:
        from .importance import calibrate_importance

        calibrate_importance(model, calibration)
    activate_qat(model)
    return model


def remove_qat(model: nn.Module, bake_weights: bool = False) -> nn.Module:
    """Give every layer back its plain form (nn.Linear / nn.Embedding / the original experts class)
    holding the same Parameters.

    ``bake_weights=True`` first writes the fake-quantized values into the weights (active units
    only), so the plain model computes what the QAT model computed. With PEFT LoRA in merged mode the
    baked weight is ``Q(W + delta)`` and the adapters are marked merged (the delta counted once).
    """
    if bake_weights:
        deltas = weight_deltas(model)
        for _, weight in quantizer_units(model):
            if weight.is_qat_active:
                with torch.no_grad():
                    weight.weight.copy_(weight.weight_quantizer.quantized(weight.full_weight(deltas.get(id(weight.module)))))
    detach_lora(model, baked=bake_weights)
    replacements = {}
    for _, module in list(qat_modules(model)):
        if isinstance(module, QATExperts):
            experts.uninstall(module)
        else:
            replacements[id(module)] = module.to_linear() if isinstance(module, QATLinear) else module.to_embedding()
    _replace_modules(model, replacements)
    return model


@torch.no_grad()
def quantization_error(model: nn.Module) -> float:
    """Mean over the quantized weights (each once) of ``||Q(w) - w||^2 / ||w||^2`` (0 when nothing
    is initialised). A full pass over the weights: the callback calls it at the switch and at
    evaluation only. Under FSDP2 it all-gathers each weight: call on every rank.
    """
    require_qat_modules(model, "quantization_error")
    deltas = weight_deltas(model)
    errors = [weight.weight_quantizer.error(weight.full_weight(deltas.get(id(weight.module))))
              for _, weight in quantizer_units(model) if weight.weight_quantizer.is_initialized]
    return sum(errors) / len(errors) if errors else 0.0
