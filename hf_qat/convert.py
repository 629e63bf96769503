"""Install QAT modules into a model, switch them on, initialise scales, take them out; PTQ.

``prepare_model_for_qat(model, config)`` replaces the targeted ``nn.Linear`` (and, with
``embedding_bits``, the input embedding and the LM head) by QATLinear / QATEmbedding in place. It must
run before the model is wrapped (DDP / FSDP2) and before the optimizer is built: ``QATCallback``
calls it from ``on_init_end``. The new modules are dormant: the model computes exactly what it
computed before until :func:`set_qat_active` and :func:`initialize_scales`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import torch
from torch import nn

from .config import QATConfig
from .errors import QATModelError
from .modules import QAT_MODULE_TYPES, QATEmbedding, QATLinear, QATWeightMixin
from .quantizers import get_quantizer

logger = logging.getLogger("hf_qat")



# ---------------------------------------------------------------------------------------- matching
def name_matches(name: str, pattern: str) -> bool:
    """A module name matches an entry that equals it, is a dotted suffix of it ("q_proj" matches
    "model.layers.0.self_attn.q_proj"), or is a regex that fully matches it."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _unwrapped_name(name: str) -> str:
    """PEFT puts the original layer at ``<name>.base_layer``: match user patterns against ``<name>``."""
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def _plain_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """True if ``module`` is a ``base`` whose class keeps ``base.forward`` (hf_qat can replace it)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None and isinstance(getattr(model, "lm_head", None), nn.Linear):
        head = model.lm_head
    return head


def _input_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except NotImplementedError:
        return None


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _adapter_module_ids(model: nn.Module) -> set[int]:
    """Modules that PEFT adds inside its tuner layers (LoRA A/B, ...): never quantization targets.
    Only a tuner layer's ``base_layer`` can be quantized."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            ids.update(id(sub) for sub in module.modules() if sub is not module and sub is not base)
    return ids


def find_targets(model: nn.Module, config: QATConfig) -> dict[str, nn.Linear]:
    """The nn.Linear modules ``config`` quantizes at ``config.bits``, by name (the LM head and the
    embeddings are handled by ``embedding_bits``). Raises QATModelError for entries that match
    nothing, for unsupported module types and when nothing is left to quantize."""
    head = _output_embedding(model)
    adapters = _adapter_module_ids(model)
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and id(module) not in adapters
    }
    suffixes = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linears})) or "(none)"
    if config.target_modules is None:
        candidates = {n: m for n, m in linears.items() if m is not head}
    else:
        candidates = _matching(linears, config.target_modules, "target_modules", suffixes)
    for name in _matching(linears, config.exclude_modules or [], "exclude_modules", suffixes):
        candidates.pop(name, None)

    targets: dict[str, nn.Linear] = {}
    for name, module in candidates.items():
        if _plain_forward(module, nn.Linear):
            targets[name] = module
        elif config.target_modules is not None:
            raise QATModelError(
                f"{name} is a {type(module).__name__}, which overrides nn.Linear.forward; hf_qat can only "
                "quantize plain nn.Linear layers. Remove it from target_modules"
            )
        else:
            logger.warning("hf_qat: skipping %s (%s overrides nn.Linear.forward)", name, type(module).__name__)
    if head is not None and any(m is head for m in targets.values()):
        _check_head_target(model, head, config)
    if not targets and config.embedding_bits is None:
        raise QATModelError(
            f"QATConfig selects no layer to quantize (target_modules / exclude_modules leave nothing); "
            f"Linear names end in: {suffixes}"
        )
    return targets


def _matching(linears: dict[str, nn.Linear], patterns: list[str], field: str, suffixes: str) -> dict[str, nn.Linear]:
    """The Linears whose names match any of ``patterns``; an entry matching none is an error."""
    hits: dict[str, nn.Linear] = {}
    for pattern in patterns:
        found = {n: m for n, m in linears.items() if name_matches(_unwrapped_name(n), pattern)}
        if not found:
            raise QATModelError(
                f"QATConfig.{field} entry {pattern!r} matches no nn.Linear in the model; Linear names end in: {suffixes}"
            )
        hits.update(found)
    return hits


def _check_head_target(model: nn.Module, head: nn.Module, config: QATConfig) -> None:
    """The LM head listed in target_modules: refused with embedding_bits, or when tied to the embedding."""
    if config.embedding_bits is not None:
        raise QATModelError(
            "the LM head is in target_modules and also quantized by embedding_bits; choose one "
            "(embedding_bits quantizes the input embedding and the LM head)"
        )
    emb = _input_embedding(model)
    if emb is not None and getattr(emb, "weight", None) is head.weight:
        raise QATModelError(
            "the LM head shares its weight with the input embedding (tied); quantize both with "
            "embedding_bits instead of listing the head in target_modules"
        )


def _replace_modules(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Put each new module wherever the old one is referenced (a module may have several parents)."""
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]


def prepare_model_for_qat(model: nn.Module, config: QATConfig | dict) -> nn.Module:
    """Install dormant QAT modules into ``model`` in place (and return it).

    Call before the model is wrapped for DDP/FSDP2 and before the optimizer is created (QATCallback
    does it in ``on_init_end``). Preparing twice with the same config is a no-op.
    """
    config = QATConfig.from_dict(config) if isinstance(config, dict) else config
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a QATConfig or a dict, got {type(config).__name__}")
    from .export.packed_modules import unpack_packed_layers

    restored = unpack_packed_layers(model)  # a loaded native checkpoint: back to trainable layers
    existing = get_qat_config(model)
    if existing is not None or any(True for _ in qat_modules(model)):
        if existing is not None and existing.to_dict() == config.to_dict():
            _link_adapters(model, config)
            return model
        raise QATModelError(
            "the model already holds QAT modules prepared with another config; call "
            "hf_qat.remove_qat(model) first"
        )

    targets = find_targets(model, config)
    quantizer = get_quantizer(config.resolved_method, config.bits)
    common = dict(group_size=config.group_size, scale_dtype=config.scale_dtype, scale_grad_mode=config.scale_grad_mode,
                  scale_init=config.scale_init)
    replacements: dict[int, nn.Module] = {}
    for name, linear in targets.items():
        replacements[id(linear)] = QATLinear.from_linear(
            linear, quantizer, activation_bits=config.activation_bits, name=name, **common
        )

    if config.embedding_bits is not None:
        replacements.update(_embedding_replacements(model, config, common))

    _replace_modules(model, replacements)
    for _, module in quantizer_units(model):
        module.weight_quantizer.config = config
    _link_adapters(model, config)
    if restored is not None and restored[0] == config.to_dict():
        _resume_from_steps(model, restored[1])
    logger.info("hf_qat: %d layers prepared for QAT (%s)", len(replacements), config.resolved_method)
    return model


def _resume_from_steps(model: nn.Module, steps: dict[str, torch.Tensor]) -> None:
    """A native checkpoint re-prepared with the config it was trained with continues its QAT: scales
    from the stored steps (s = step / level) and QAT on."""
    for name, module in qat_modules(model):
        step = steps.get(name)
        unit = module.weight_quantizer
        if step is not None and unit.log_scale_ratio is not None:
            unit.set_scale(step.float() / unit.spec.grid.level)
        unit.set_active(True)
        unit.mark_initialized()


def _link_adapters(model: nn.Module, config: QATConfig) -> None:
    """With PEFT LoRA: link adapters to the QAT layers (lora_mode) and keep the scales trainable even
    if PEFT froze the base model after the QAT layers were installed."""
    from .lora import attach_lora

    if attach_lora(model, config.lora_mode):
        for _, module in qat_modules(model):
            if module.weight_quantizer.log_scale_ratio is not None:
                module.weight_quantizer.log_scale_ratio.requires_grad_(True)


def _embedding_replacements(model: nn.Module, config: QATConfig, common: dict) -> dict[int, nn.Module]:
    names = _module_names(model)
    emb = _input_embedding(model)
    head = _output_embedding(model)
    if emb is None and head is None:
        raise QATModelError("QATConfig.embedding_bits is set but the model exposes no input or output embedding")
    quantizer = get_quantizer(config.resolved_embedding_method, config.embedding_bits)
    out: dict[int, nn.Module] = {}
    new_emb = None
    if emb is not None:
        if not _plain_forward(emb, nn.Embedding):
            raise QATModelError(
                f"{names.get(id(emb), 'the input embedding')} is a {type(emb).__name__}, which overrides "
                "nn.Embedding.forward; hf_qat cannot quantize it (leave embedding_bits unset)"
            )
        new_emb = QATEmbedding.from_embedding(emb, quantizer, name=names.get(id(emb), "embed_tokens"), **common)
        out[id(emb)] = new_emb
    if head is not None:
        if not _plain_forward(head, nn.Linear):
            raise QATModelError(f"the LM head is a {type(head).__name__}, which hf_qat cannot quantize")
        tied = new_emb is not None and head.weight is emb.weight
        new_head = QATLinear.from_linear(
            head, quantizer, name=names.get(id(head), "lm_head"),
            shared=new_emb.weight_quantizer if tied else None, **common,
        )
        out[id(head)] = new_head
    return out


# ---------------------------------------------------------------------------------------- state
def get_qat_config(model: nn.Module) -> QATConfig | None:
    """The QATConfig a model was prepared with (None if it was not)."""
    for _, module in qat_modules(model):
        return module.weight_quantizer.config
    return None


def qat_modules(model: nn.Module) -> Iterator[tuple[str, QATWeightMixin]]:
    """``(name, module)`` for every QAT module, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QAT_MODULE_TYPES):
            yield name, module


def quantizer_units(model: nn.Module) -> Iterator[tuple[str, QATWeightMixin]]:
    """``(name, layer)`` for the first layer of every distinct unit (a tied head shares its
    embedding's unit and weight, so it is skipped)."""
    seen: set[int] = set()
    for name, module in qat_modules(model):
        if id(module.weight_quantizer) not in seen:
            seen.add(id(module.weight_quantizer))
            yield name, module


def set_qat_active(model: nn.Module, active: bool = True) -> int:
    """Switch every QAT unit on (or off); returns how many there are."""
    count = 0
    for _, module in quantizer_units(model):
        module.weight_quantizer.set_active(active)
        count += 1
    return count


def is_qat_active(model: nn.Module) -> bool:
    return any(module.is_qat_active for _, module in qat_modules(model))


def initialize_scales(model: nn.Module, force: bool = False) -> int:
    """Initialise every unit's scale from its full weight (with PEFT's merged LoRA delta); returns
    how many were initialised.

    Under FSDP2 this all-gathers each weight, so call it on every rank (QATCallback does, at the
    switch). Raises QATRuntimeError if a weight holds NaN/Inf.
    """
    from .lora import weight_deltas

    deltas = weight_deltas(model)
    count = 0
    for _, module in quantizer_units(model):
        if module.weight_quantizer.is_initialized and not force:
            continue
        module.weight_quantizer.initialize(module.full_weight(deltas.get(id(module))).detach())
        count += 1
    return count


def activate_qat(model: nn.Module) -> None:
    """Switch QAT on and initialise the scales that are not yet (what the callback does at the switch)."""
    set_qat_active(model, True)
    initialize_scales(model)


def ptq(model: nn.Module, config: QATConfig | dict) -> nn.Module:
    """One-shot round-to-nearest post-training quantization on the same grids (the PTQ baseline).

    Installs the QAT modules (if needed), activates them and initialises every scale with the
    family's rule (max|w| / Qp for LSQ, max|w| for SEQ, mean|w| for binary), without training. The
    model then computes with the quantized weights and can be exported like a QAT model.
    """
    prepare_model_for_qat(model, config)
    activate_qat(model)
    return model


def remove_qat(model: nn.Module, bake_weights: bool = False) -> nn.Module:
    """Replace every QAT module by a plain nn.Linear / nn.Embedding holding the same Parameters.

    ``bake_weights=True`` first writes the fake-quantized values into the weights (active units
    only), so the plain model computes what the QAT model computed. With PEFT LoRA in merged mode the
    baked weight is ``Q(W + delta)`` and the adapters are marked merged (the delta counted once).
    """
    from .lora import detach_lora, weight_deltas

    if bake_weights:
        deltas = weight_deltas(model)
        for _, module in quantizer_units(model):
            if module.is_qat_active:
                with torch.no_grad():
                    module.weight.copy_(module.weight_quantizer.quantized(module.full_weight(deltas.get(id(module)))))
    detach_lora(model, baked=bake_weights)
    replacements = {id(module): module.to_linear() if isinstance(module, QATLinear) else module.to_embedding()
                    for _, module in qat_modules(model)}
    _replace_modules(model, replacements)
    return model


@torch.no_grad()
def quantization_error(model: nn.Module) -> float:
    """Mean over the quantized weights (each once) of ``||Q(w) - w||^2 / ||w||^2`` (0 when nothing
    is initialised). A full pass over the weights: the callback calls it at the switch and at
    evaluation only. Under FSDP2 it all-gathers each weight: call on every rank.
    """
    from .lora import weight_deltas

    deltas = weight_deltas(model)
    errors = [module.weight_quantizer.error(module.full_weight(deltas.get(id(module))))
              for _, module in quantizer_units(model) if module.weight_quantizer.is_initialized]
    return sum(errors) / len(errors) if errors else 0.0
