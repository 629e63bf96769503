"""How much of a prepared model QAT quantizes: the one line logged after install, and its numbers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .targets import adapter_module_ids, input_embedding, output_embedding
from .unit import WeightQuantizer
from .weights import quantized_weights


@dataclass(frozen=True)
class Coverage:
    """Quantized share of the non-embedding weights.

    Attributes:
        quantized: elements of the quantized weights, the input embedding and LM head excluded.
        total: elements of every floating weight of two or more dims (each tensor once), the input
            embedding, the LM head, biases (e.g. experts' ``gate_up_proj_bias``), PEFT adapters and the
            units' own scales excluded.
        largest_fp: the (at most three) largest of those weights left in full precision, as
            ``(parameter name, elements)``, largest first.
    """

    quantized: int
    total: int
    largest_fp: tuple[tuple[str, int], ...]

    @property
    def fraction(self) -> float:
        return self.quantized / self.total if self.total else 0.0

    def __str__(self) -> str:
        fp = ", ".join(f"{name} ({count:,})" for name, count in self.largest_fp) or "none"
        return (f"{100 * self.fraction:.1f}% of the non-embedding weight elements quantized "
                f"({self.quantized:,} of {self.total:,}); largest left in FP: {fp}")


def coverage(model: nn.Module) -> Coverage:
    """The :class:`Coverage` of ``model`` (prepared or not: an unprepared model has 0 %)."""
    quantized_ids = {id(weight.weight) for _, weight in quantized_weights(model)}
    embeddings = {id(m.weight) for m in (input_embedding(model), output_embedding(model))
                  if m is not None and getattr(m, "weight", None) is not None}
    adapters = adapter_module_ids(model)
    not_weights = {id(p) for m in model.modules() if id(m) in adapters or isinstance(m, WeightQuantizer)
                   for p in m.parameters(recurse=False)}
    quantized = total = 0
    fp: list[tuple[str, int]] = []
    for name, param in model.named_parameters():
        if (param.ndim < 2 or not param.is_floating_point() or "bias" in name.rsplit(".", 1)[-1]
                or id(param) in embeddings or id(param) in not_weights):
            continue
        total += param.numel()
        if id(param) in quantized_ids:
            quantized += param.numel()
        else:
            fp.append((name, param.numel()))
    return Coverage(quantized, total, tuple(sorted(fp, key=lambda item: -item[1])[:3]))
