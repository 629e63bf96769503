"""Fused mixture-of-experts weights as QAT units, and the routers that stay in full precision.

Since transformers 5 the experts of an MoE block are ONE module with fused 3-D Parameters (their layout:
:mod:`hf_qat.expert_layout`), decorated by ``transformers.integrations.moe.use_experts_implementation``,
which puts the layout on every instance and dispatches ``forward`` on ``config._experts_implementation``
(eager, batched_mm, grouped_mm). Every implementation reads ``self.gate_up_proj`` / ``self.down_proj``.

QAT installs onto such a module in place: its class becomes ``QAT<class>`` (a subclass, so
``isinstance`` checks and state-dict keys are unchanged) and each fused weight ``P`` gets one
:class:`~hf_qat.model.unit.WeightQuantizer` as the child ``P_quantizer`` (keys ``...experts.P_quantizer.*``,
as ``...q_proj.weight_quantizer.*`` for a Linear). While a unit is active, the forward computes each
fake-quantized weight once, puts it where the implementation reads ``P`` for the duration of that
forward, and puts the Parameter back; dormant, the forward is the original one, bit for bit.

Routers (``mlp.gate`` TopKRouters ``[E, H]``, gemma4's ``router.proj``, qwen2_moe's one-row
``shared_expert_gate``) are recognised by their place and shape, not by name: a sibling of an experts
module whose every weight maps the experts' input (H) to one value per expert (or one gate value).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from ..expert_layout import LAYOUT_ATTRIBUTES, linear_dims
from .unit import UNIT_SUFFIX, WeightQuantizer



def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module: the layout attributes and at least one fused 3-D weight."""
    return all(hasattr(module, a) for a in LAYOUT_ATTRIBUTES) and bool(fused_weights(module))


def fused_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's own floating 3-D Parameters ``[E, out, in]`` (or ``[E, in, out]``), by name."""
    return {name: p for name, p in module.named_parameters(recurse=False) if p.ndim == 3 and p.is_floating_point()}


def experts_input_dim(module: nn.Module) -> int:
    """H: the input width of the experts' first projection (``gate_up_proj``, or ``up_proj`` without
    ``has_gate``, as transformers' implementations read them): the hidden size the router also reads."""
    weight = module.gate_up_proj if module.has_gate else module.up_proj
    return linear_dims(weight.shape, module.is_transposed)[2]


def router_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The routers of every MoE block, by module name: each direct child of a module holding fused
    experts (other than the experts) whose every floating weight of two or more dims is
    ``[num_experts or 1, H]``."""
    routers: dict[str, nn.Module] = {}
    for parent_name, parent in model.named_modules():
        experts = [m for m in parent.children() if is_fused_experts(m)]
        if not experts:
            continue
        num_experts = int(next(iter(fused_weights(experts[0]).values())).shape[0])
        hidden = experts_input_dim(experts[0])
        for child_name, child in parent.named_children():
            if any(child is e for e in experts):
                continue
            weights = [p for p in child.parameters() if p.ndim >= 2 and p.is_floating_point()]
            if weights and all(tuple(p.shape) in ((num_experts, hidden), (1, hidden)) for p in weights):
                routers[f"{parent_name}.{child_name}" if parent_name else child_name] = child
    return routers


@contextlib.contextmanager
def substituted_parameters(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, ``module.<name>`` reads ``tensors[name]`` (no Parameter is created or moved:
    the entries of ``module._parameters`` are swapped and always put back)."""
    stored = {name: module._parameters.get(name) for name in tensors}
    module._parameters.update(tensors)
    try:
        yield
    finally:
        for name, value in stored.items():
            if value is None:
                del module._parameters[name]
            else:
                module._parameters[name] = value


class QATExperts(nn.Module):
    """The QAT behaviour mixed into a fused experts class (see the module docstring); built by
    :func:`mixed_class`, installed by :func:`install`. ``experts_class`` is the original class."""

    experts_class: type[nn.Module]

    def weight_quantizers(self) -> dict[str, WeightQuantizer]:
        """``parameter name -> its unit``."""
        return {name[: -len(UNIT_SUFFIX)]: unit for name, unit in self.named_children()
                if isinstance(unit, WeightQuantizer) and name.endswith(UNIT_SUFFIX)}

    @property
    def is_qat_active(self) -> bool:
        return any(unit.is_active for unit in self.weight_quantizers().values())

    def forward(self, *args, **kwargs):
        units = {name: unit for name, unit in self.weight_quantizers().items() if unit.is_active}
        if not units:
            return super().forward(*args, **kwargs)
        quantized = {name: unit.fake_quantize(self._parameters[name]) for name, unit in units.items()}
        with substituted_parameters(self, quantized):
            return super().forward(*args, **kwargs)


@functools.cache
def mixed_class(mixin: type[nn.Module], experts_class: type[nn.Module], prefix: str) -> type[nn.Module]:
    """``<prefix><experts_class>``: the experts class with ``mixin`` in front (one per pair), remembering
    the original as ``experts_class`` (QAT experts here, packed experts in the native format)."""
    return type(f"{prefix}{experts_class.__name__}", (mixin, experts_class),
                {"__module__": mixin.__module__, "experts_class": experts_class})


def install(module: nn.Module, units: dict[str, WeightQuantizer]) -> None:
    """Make ``module`` (a fused experts module) compute with its fused weights' ``units`` in place."""
    module.__class__ = mixed_class(QATExperts, type(module), "QAT")
    for name, unit in units.items():
        module.add_module(name + UNIT_SUFFIX, unit)


def uninstall(module: QATExperts) -> None:
    """Drop the units and give ``module`` back its original class (the Parameters never moved)."""
    for name in module.weight_quantizers():
        delattr(module, name + UNIT_SUFFIX)
    module.__class__ = module.experts_class
