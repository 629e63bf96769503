"""Which weights a QATConfig quantizes: one pass over an unprepared model.

A weight is what a module computes with, not a module type. The rules:

* every plain ``nn.Linear`` except the LM head and the routers;
* every fused expert weight (``mlp.experts.gate_up_proj``, ``down_proj``: :mod:`hf_qat.model.experts`);
* with ``embedding_bits`` (or a ``gguf_mix`` file type): the input embedding and the LM head (tied or not);
* ``target_modules`` replaces the first two rules by the names it lists (module names, and for fused
  experts also ``<experts module>.<parameter>``), so it can also select a Linear router;
  ``exclude_modules`` removes names (and silences the check below for what it names).

Left in full precision without a word: norms and other 1-D tensors, biases, routers, embeddings and
the LM head (unless ``embedding_bits``), PEFT adapters. Any other floating weight of two or more
dimensions (any module type, any shape) is a QATModelError naming it, never a silently FP weight.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

from torch import nn

from ..config import QATConfig
from ..errors import QATModelError
from .experts import fused_weights, is_fused_experts, router_modules
from .modules import embedding_scale

logger = logging.getLogger("hf_qat")


@dataclass(frozen=True)
class WeightTarget:
    """A weight the config quantizes, found before anything is installed.

    Attributes:
        name: the weight's name (as :class:`hf_qat.model.weights.QuantizedWeight.name`).
        module_name, module, parameter: where it lives (``module.<parameter>``).
        kind: "linear", "embedding" or "experts".
        embedding: quantized at ``embedding_bits`` (the input embedding and the LM head).
        transposed: a fused expert stack stored ``[E, in, out]`` (the module's ``is_transposed``).
        tied_to: for an LM head that shares the input embedding's weight, the embedding's name.
    """

    name: str
    module_name: str
    module: nn.Module
    parameter: str
    kind: str
    embedding: bool = False
    transposed: bool = False
    tied_to: str | None = None


# ---------------------------------------------------------------------------------------- matching
def name_matches(name: str, pattern: str) -> bool:
    """A name matches an entry that equals it, is a dotted suffix of it ("q_proj" matches
    "model.layers.0.self_attn.q_proj"), or is a regex that fully matches it."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def unwrapped_name(name: str) -> str:
    """PEFT puts the original layer at ``<name>.base_layer``: match user patterns against ``<name>``."""
    return name.replace(".base_layer", "")


def _plain_forward(module: nn.Module, base: type[nn.Module]) -> bool:
    """True if ``module`` is a ``base`` whose class keeps ``base.forward`` (hf_qat can replace it)."""
    return isinstance(module, base) and type(module).forward is base.forward


def output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None and isinstance(getattr(model, "lm_head", None), nn.Linear):
        head = model.lm_head
    return head


def input_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except NotImplementedError:
        return None


def adapter_module_ids(model: nn.Module) -> set[int]:
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


class _Survey:
    """What selecting the targets reads of a model, each read once (the input embedding and the parameter
    names only when a rule asks for them).

    Attributes:
        model: the surveyed model.
        modules: ``model.named_modules()`` (the root's name is "").
        names: module name by ``id(module)``.
        stacks: the fused experts modules' 3-D weights by parameter name, by module name.
        routers: the MoE routers by module name (:func:`hf_qat.model.experts.router_modules`).
        router_names: every module name inside a router (the router itself and e.g. gemma4's ``router.proj``).
        head: the LM head (None where the model has none).
        adapters: ``id`` of every module PEFT adds inside its tuner layers (:func:`adapter_module_ids`).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = tuple(model.named_modules())
        self.names = {id(module): name for name, module in self.modules}
        self.stacks = {name: fused_weights(module) for name, module in self.modules if is_fused_experts(module)}
        self.routers = router_modules(model)
        prefixes = [unwrapped_name(r) for r in self.routers]
        self.router_names = {name for name, _ in self.modules if any(name == r or name.startswith(r + ".") for r in prefixes)}
        self.head = output_embedding(model)
        self.adapters = adapter_module_ids(model)

    @functools.cached_property
    def embedding(self) -> nn.Module | None:
        """The input embedding (None where the model has none)."""
        return input_embedding(self.model)

    @functools.cached_property
    def parameter_names(self) -> list[str]:
        """``model.named_parameters()``'s names (what ``exclude_modules`` may also name)."""
        return [name for name, _ in self.model.named_parameters()]


# ---------------------------------------------------------------------------------------- finding
def _candidates(survey: _Survey) -> tuple[dict[str, WeightTarget], dict[str, WeightTarget]]:
    """``(default targets, every selectable target)`` at ``config.bits``, by weight name: Linear layers
    and fused expert weights (the LM head and the routers are selectable, never default)."""
    default: dict[str, WeightTarget] = {}
    selectable: dict[str, WeightTarget] = {}
    for name, module in survey.modules:
        if not name or id(module) in survey.adapters:
            continue
        if isinstance(module, nn.Linear):
            target = WeightTarget(name, name, module, "weight", "linear")
            selectable[name] = target
            if module is not survey.head and unwrapped_name(name) not in survey.router_names:
                default[name] = target
        elif name in survey.stacks:
            for parameter in survey.stacks[name]:
                weight_name = f"{name}.{parameter}"
                default[weight_name] = selectable[weight_name] = WeightTarget(
                    weight_name, name, module, parameter, "experts", transposed=bool(module.is_transposed))
    return default, selectable


def _matches(target: WeightTarget, pattern: str) -> bool:
    return name_matches(unwrapped_name(target.name), pattern) or (
        target.kind == "experts" and name_matches(unwrapped_name(target.module_name), pattern))


def _selected(targets: dict[str, WeightTarget], patterns: list[str]) -> dict[str, WeightTarget]:
    return {n: t for n, t in targets.items() if any(_matches(t, p) for p in patterns)}


def select_targets(model: nn.Module, config: QATConfig) -> dict[str, WeightTarget]:
    """Every weight ``config`` quantizes, by weight name: :func:`find_targets`, then the embeddings'
    (``embedding_bits`` or ``gguf_mix``; a tied LM head ``tied_to`` its embedding), then the check that no
    floating weight is left uncovered. Raises QATModelError where the model and the config disagree."""
    survey = _Survey(model)
    targets = _found(survey, config)
    embeddings = _embedding_targets(survey, config)
    _check_uncovered(survey, config, targets)
    return {**targets, **embeddings}


def find_targets(model: nn.Module, config: QATConfig) -> dict[str, WeightTarget]:
    """The weights ``config`` quantizes at ``config.bits``, by weight name (the LM head and the
    embeddings are handled by ``embedding_bits``). Raises QATModelError for entries that match
    nothing, for module types hf_qat cannot quantize and when nothing is left to quantize."""
    return _found(_Survey(model), config)


def _found(survey: _Survey, config: QATConfig) -> dict[str, WeightTarget]:
    default, selectable = _candidates(survey)
    suffixes = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in selectable})) or "(none)"
    if config.target_modules is None:
        candidates = default
    else:
        candidates = {}
        for pattern in config.target_modules:
            found = _selected(selectable, [pattern])
            if not found:
                raise QATModelError(_no_match_message(survey, pattern, "target_modules", suffixes))
            candidates.update(found)
    names = ([n for n, _ in survey.modules if n] + survey.parameter_names) if config.exclude_modules else []
    for pattern in config.exclude_modules or []:
        if not any(name_matches(unwrapped_name(n), pattern) for n in names):
            raise QATModelError(f"QATConfig.exclude_modules entry {pattern!r} matches no module or parameter of the "
                                f"model; quantizable weights end in: {suffixes}")
    for name in _selected(candidates, config.exclude_modules or []):
        candidates.pop(name)

    targets: dict[str, WeightTarget] = {}
    for name, target in candidates.items():
        if target.kind == "experts" or _plain_forward(target.module, nn.Linear):
            targets[name] = target
        elif config.target_modules is not None:
            raise QATModelError(
                f"{name} is a {type(target.module).__name__}, which overrides nn.Linear.forward; hf_qat can only "
                "quantize plain nn.Linear layers. Remove it from target_modules"
            )
    if survey.head is not None and any(t.module is survey.head for t in targets.values()):
        _check_head_target(survey, config)
    if not targets and config.embedding_bits is None:
        conv1d = _conv1d_names(survey)
        if conv1d:
            raise QATModelError(_conv1d_message(conv1d))
        raise QATModelError(
            f"QATConfig selects no layer to quantize (target_modules / exclude_modules leave nothing); "
            f"quantizable weights end in: {suffixes}"
        )
    return targets


def _conv1d_names(survey: _Survey) -> list[str]:
    """The modules that are transformers' ``Conv1D`` (GPT-2 and its kin: ``c_attn``, ``c_fc``, ``c_proj``)."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in survey.modules if isinstance(module, Conv1D)]


def _conv1d_message(names: list[str]) -> str:
    suffixes = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in names}))
    return (f"{len(names)} layers of this model ({suffixes}) are transformers' Conv1D (GPT-2 style: a Linear whose "
            "weight is stored transposed, [in, out]); hf_qat quantizes nn.Linear layers and does not support Conv1D "
            "yet. Train a model family whose layers are nn.Linear (Llama, Qwen, Mistral, Gemma, ...), or keep these "
            "layers in FP with QATConfig(exclude_modules=[...]) and quantize the rest")


def _no_match_message(survey: _Survey, pattern: str, field: str, suffixes: str) -> str:
    for name, module in survey.routers.items():
        if name_matches(unwrapped_name(name), pattern):
            return (f"QATConfig.{field} entry {pattern!r} names the router {name}, a {type(module).__name__} that "
                    "computes with its own weight Parameter; hf_qat quantizes routers only where they are nn.Linear "
                    "layers (e.g. qwen2_moe's shared_expert_gate). Leave the router in full precision")
    return f"QATConfig.{field} entry {pattern!r} matches no quantizable weight in the model; their names end in: {suffixes}"


def _check_head_target(survey: _Survey, config: QATConfig) -> None:
    """The LM head listed in target_modules: refused with embedding_bits, or when tied to the embedding."""
    if config.embedding_bits is not None:
        raise QATModelError(
            "the LM head is in target_modules and also quantized by embedding_bits; choose one "
            "(embedding_bits quantizes the input embedding and the LM head)"
        )
    emb, head = survey.embedding, survey.head
    if emb is not None and getattr(emb, "weight", None) is head.weight:
        raise QATModelError(
            "the LM head shares its weight with the input embedding (tied); quantize both with "
            "embedding_bits instead of listing the head in target_modules"
        )


def _embedding_targets(survey: _Survey, config: QATConfig) -> dict[str, WeightTarget]:
    """With ``embedding_bits`` or ``gguf_mix``: the input embedding and the LM head (the head marked
    ``tied_to`` the embedding when they share their weight); empty otherwise."""
    if config.embedding_bits is None and config.gguf_mix is None:
        return {}
    names, emb, head = survey.names, survey.embedding, survey.head
    if emb is None and head is None:
        raise QATModelError("QATConfig.embedding_bits is set but the model exposes no input or output embedding")
    emb, head = _unless_excluded(emb, head, names, config)
    out: dict[str, WeightTarget] = {}
    if emb is not None:
        name = names.get(id(emb), "embed_tokens")
        setting = f"gguf_mix={config.gguf_mix!r} quantizes it" if config.embedding_bits is None else "embedding_bits is set"
        tied = [names.get(id(head), "lm_head")] if head is not None and head.weight is emb.weight else []
        embedding_scale(emb, name, f". hf_qat cannot quantize it ({setting}); keep it in float with "
                                   f"exclude_modules={[name, *tied]!r}")
        out[name] = WeightTarget(name, name, emb, "weight", "embedding", embedding=True)
    if head is not None:
        name = names.get(id(head), "lm_head")
        if not _plain_forward(head, nn.Linear):
            raise QATModelError(f"the LM head is a {type(head).__name__}, which hf_qat cannot quantize")
        tied = emb is not None and head.weight is emb.weight
        out[name] = WeightTarget(name, name, head, "weight", "linear", embedding=True,
                                 tied_to=names.get(id(emb)) if tied else None)
    return out


def _unless_excluded(emb: nn.Module | None, head: nn.Module | None, names: dict[int, str],
                     config: QATConfig) -> tuple[nn.Module | None, nn.Module | None]:
    """The embedding and the head, each None where ``exclude_modules`` names it (a tied pair is excluded
    whole or not at all: one weight cannot be both on the grid and in float)."""
    def excluded(module: nn.Module | None) -> bool:
        name = unwrapped_name(names.get(id(module), ""))
        return module is not None and any(name_matches(n, p) for n in (name, f"{name}.weight")
                                          for p in config.exclude_modules or [])

    emb_out, head_out = excluded(emb), excluded(head)
    if emb is not None and head is not None and head.weight is emb.weight and emb_out != head_out:
        kept, dropped = (names[id(emb)], names[id(head)]) if head_out else (names[id(head)], names[id(emb)])
        raise QATModelError(
            f"QATConfig.exclude_modules names {dropped} but not {kept}, which shares its weight (tied): one weight "
            f"cannot be both quantized and in full precision. Exclude both ({dropped!r}, {kept!r}) or neither")
    if config.gguf_mix is not None and (emb_out or head_out):
        kept = [names[id(m)] for m, out in ((emb, emb_out), (head, head_out)) if out and m is not None]
        logger.warning("hf_qat: exclude_modules keeps %s in float: llama.cpp's %s file quantizes it, hf_qat's GGUF "
                       "export writes it in F32", ", ".join(kept), config.gguf_mix)
    return None if emb_out else emb, None if head_out else head


def _check_uncovered(survey: _Survey, config: QATConfig, targets: dict[str, WeightTarget]) -> None:
    """Raise QATModelError naming every floating weight of two or more dims that no rule covers and
    nobody excluded (see the module docstring)."""
    if config.target_modules is not None:  # the user chose the weights: the rest stays FP by choice
        return
    quantized = {id(getattr(t.module, t.parameter)) for t in targets.values()}
    left_fp = {id(m.weight) for m in (survey.embedding, survey.head) if m is not None}
    excluded = config.exclude_modules or []
    uncovered = []
    for module_name, module in survey.modules:
        if (id(module) in survey.adapters or unwrapped_name(module_name) in survey.router_names
                or isinstance(module, nn.Embedding)):
            continue
        for parameter, weight in module.named_parameters(recurse=False):
            full = f"{module_name}.{parameter}" if module_name else parameter
            if (weight.ndim < 2 or not weight.is_floating_point() or "bias" in parameter or id(weight) in quantized
                    or id(weight) in left_fp
                    or any(name_matches(unwrapped_name(n), p) for n in (module_name, full) for p in excluded if n)):
                continue
            uncovered.append((full, module_name, module, weight))
    conv1d = _conv1d_names(survey)
    if any(module_name in conv1d for _, module_name, _, _ in uncovered):
        raise QATModelError(_conv1d_message(conv1d))
    if uncovered:
        full, module_name, module, weight = uncovered[0]
        more = f" (and {len(uncovered) - 1} more: {', '.join(u[0] for u in uncovered[1:4])}...)" if len(uncovered) > 1 else ""
        raise QATModelError(
            f"{full} ({type(module).__name__}, shape {tuple(weight.shape)}) is a floating weight that hf_qat has no "
            f"rule to quantize; it would silently stay in full precision{more}. Keep it in FP on purpose with "
            f"QATConfig(exclude_modules=[{module_name!r}]), or list the weights to quantize in target_modules"
        )
