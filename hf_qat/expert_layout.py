"""What a fused expert stack is, for every module that reads or writes one.

Since transformers 5 the experts of an MoE block are ONE module with fused 3-D Parameters, and
``transformers.integrations.moe.use_experts_implementation`` puts their layout on every instance
(:data:`LAYOUT_ATTRIBUTES`):

* ``gate_up_proj [E, 2I, H]`` concatenates two projections along its output rows, gate first, then up
  (``has_gate``; without it the module has ``up_proj [E, I, H]``); ``down_proj [E, H, I]``;
* ``is_transposed``: every stack is stored ``[E, in, out]`` instead (gpt_oss);
* ``has_bias``: each stack has a ``<parameter>_bias [E, out]``.

Model surgery (:mod:`hf_qat.model.experts`), the unit's view of a stack
(:class:`~hf_qat.quantizers.base.MatrixView`), llama.cpp's tensor names (:mod:`hf_qat.llamacpp.tensors`)
and the exporters ask here; docs/architecture.md has the recipe for a new layout.
"""

from __future__ import annotations

LAYOUT_ATTRIBUTES = ("is_transposed", "is_concatenated", "has_gate", "has_bias")
# The projections each fused stack holds, in the order of its output rows.
PROJECTIONS = {"gate_up_proj": ("gate", "up"), "up_proj": ("up",), "down_proj": ("down",)}


def projections(parameter: str) -> tuple[str, ...]:
    """The projections the fused stack ``parameter`` holds, in row order (``("gate", "up")`` for
    ``gate_up_proj``); () for a parameter no layout names."""
    return PROJECTIONS.get(parameter, ())


def linear_dims(shape, transposed: bool) -> tuple[int, int, int]:
    """``(E, out, in)`` of a stack stored with ``shape`` (``[E, in, out]`` when ``transposed``): each expert's
    matrix as a Linear's ``[out, in]``."""
    experts, a, b = (int(n) for n in shape)
    return (experts, b, a) if transposed else (experts, a, b)
