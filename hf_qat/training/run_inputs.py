"""What the planner needs from a training run: N (parameters) and the tokens of one optimizer step.

N counts every parameter once (:func:`count_parameters`); for a mixture of experts the plan also
states the active parameters (:func:`active_parameters`), and ``QATConfig.moe_params`` picks which
of the two the tokens per parameter byte use.

Tokens per step = examples per step (batch per device x gradient accumulation x world size) x tokens
per example. Tokens per example is ``QATConfig.sequence_length`` when set; otherwise it is measured:
the mean number of real tokens (the attention mask's ones, else the length of ``input_ids``) over up
to :data:`SAMPLED_EXAMPLES` training examples drawn with the run's seed (without touching the global
RNG that the Trainer's sampler uses). One example is not enough: with variable-length data the first
one can be ten times the mean.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

from ..errors import QATConfigError
from ..model.convert import quantized_weights
from ..model.experts import fused_weights, is_fused_experts
from .optim import scale_parameters

SAMPLED_EXAMPLES = 256
# A coefficient of variation of the sampled lengths above this is reported as a plan warning.
LENGTH_SPREAD_WARNING = 0.25


def count_parameters(model: torch.nn.Module, quantized_only: bool = False) -> int:
    """N for the planner: every parameter once (tied tensors once, QAT scales excluded), or only the
    quantized weights."""
    scales = {id(p) for p in scale_parameters(model)}
    if quantized_only:
        weights = {id(w.weight): w.weight for _, w in quantized_weights(model)}
        return sum(p.numel() for p in weights.values())
    return sum(p.numel() for p in model.parameters() if id(p) not in scales)


def active_parameters(model: torch.nn.Module, quantized_only: bool = False) -> int | None:
    """The parameters one token uses in a mixture of experts: :func:`count_parameters` (on the same
    basis, ``quantized_only``), less the share of each fused experts module's stacked ``[experts, ...]``
    tensors that a token is not routed to (it uses ``config.num_experts_per_tok`` of them); None for a
    model without fused experts."""
    modules = [m for m in model.modules() if is_fused_experts(m)]
    if not modules:
        return None
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    if not isinstance(top_k, int) or top_k < 1:
        raise QATConfigError("moe_params", "active", "'total'", detail="the model has experts but its config names no "
                             "num_experts_per_tok, so the active parameters cannot be counted")
    stacks = [p for m in modules for p in (fused_weights(m).values() if quantized_only else
                                          (q for q in m.parameters(recurse=False) if q.ndim >= 1))]
    unused = sum(p.numel() * (p.shape[0] - min(top_k, p.shape[0])) / p.shape[0] for p in stacks)
    return round(count_parameters(model, quantized_only) - unused)


@dataclass(frozen=True)
class TokensPerStep:
    """Tokens per optimizer step and how they were counted (both go into the plan)."""

    tokens: int
    source: str
    warning: str | None = None


def _example_tokens(example) -> int:
    mask = example.get("attention_mask") if hasattr(example, "get") else None
    if mask is not None:
        return int(torch.as_tensor(mask).sum())
    return len(example["input_ids"])


def _sampled_examples(dataset, seed: int, count: int) -> list:
    try:
        size = len(dataset)
    except TypeError:  # an iterable dataset: its first examples
        return list(itertools.islice(iter(dataset), count))
    return [dataset[i] for i in random.Random(seed).sample(range(size), min(count, size))]


def tokens_per_step(args: TrainingArguments, sequence_length: int | None, train_dataset=None) -> TokensPerStep:
    """Tokens per optimizer step (see the module docstring); raises QATConfigError naming
    ``sequence_length`` when it can be neither read from the config nor measured."""
    examples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if sequence_length is not None:
        return TokensPerStep(int(examples_per_step * sequence_length), f"QATConfig.sequence_length={sequence_length}")
    try:
        lengths = [_example_tokens(e) for e in _sampled_examples(train_dataset, args.seed, SAMPLED_EXAMPLES)]
    except (TypeError, KeyError, IndexError, AttributeError, NotImplementedError):
        lengths = []
    if not lengths:
        raise QATConfigError(
            "sequence_length", None, "the tokens per training example",
            detail="start='auto' could not read input_ids from the training examples; set it explicitly",
        )
    mean = sum(lengths) / len(lengths)
    spread = math.sqrt(sum((n - mean) ** 2 for n in lengths) / len(lengths)) / mean if mean else 0.0
    source = (f"mean real tokens of {len(lengths)} sampled training examples ({mean:.1f}; min {min(lengths)}, "
              f"max {max(lengths)}) x {examples_per_step} examples per step")
    warning = None
    if spread > LENGTH_SPREAD_WARNING:
        warning = (f"training examples vary in length (min {min(lengths)}, mean {mean:.1f}, max {max(lengths)} tokens "
                   f"over {len(lengths)} sampled): the plan counts their mean; if a collator packs or truncates them, "
                   "set QATConfig.sequence_length to the tokens one example really trains on")
    return TokensPerStep(max(1, round(examples_per_step * mean)), source, warning)
