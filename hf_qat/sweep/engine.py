"""Training a sweep run: the model of a size, AdamW, the step loop, evaluation and checkpoints.

One loop (:func:`train_steps`) trains trunks, tails and unbranched runs alike. What a step computes
depends only on the model and optimizer state, the step's batch (:class:`SweepData`) and the step's
LR multiplier: no dropout, no random state. A checkpoint holds the model's state dict and AdamW's
state per parameter *name*, so a tail can load an FP trunk checkpoint into a model that QAT layers
were installed on (same parameter names, plus the scales whose state starts empty, as in a run
from scratch where the dormant scales get no gradient before the switch).
"""

from __future__ import annotations

import copy
import os
from typing import Callable

import torch

from ..config import QATConfig
from ..model.convert import activate_qat, prepare_model_for_qat
from ..model.unit import UNIT_KEY
from ..training.optim import add_scale_param_group
from ..training.run_inputs import active_parameters, count_parameters
from .config import SweepConfig
from .data import SweepData

CHECKPOINT_FORMAT = 1


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_config(config: SweepConfig, size: str):
    """The transformers config of a sweep size: its ``architecture`` ("llama" by default, or a mixture of
    experts such as "qwen3_moe") with its overrides on the sweep's vocabulary and sequence length."""
    from transformers import AutoConfig

    overrides = dict(config.sizes[size])
    architecture = overrides.pop("architecture", "llama")
    hidden = overrides["hidden_size"]
    heads = overrides.setdefault("num_attention_heads", 4)
    overrides.setdefault("num_key_value_heads", heads)
    overrides.setdefault("intermediate_size", 3 * hidden)
    overrides.setdefault("num_hidden_layers", 2)
    if architecture != "llama":
        overrides.setdefault("head_dim", hidden // heads)
    if architecture == "qwen3_moe":
        overrides.setdefault("moe_intermediate_size", overrides["intermediate_size"])
        overrides.setdefault("norm_topk_prob", True)  # as the released Qwen3-MoE models (and llama.cpp's graph)
    return AutoConfig.for_model(architecture, vocab_size=config.vocab_size,
                                max_position_embeddings=config.sequence_length,
                                tie_word_embeddings=config.tie_word_embeddings, bos_token_id=0, eos_token_id=0,
                                pad_token_id=0, **overrides)


def build_model(config: SweepConfig, size: str, seed: int, on: torch.device | str | None = None):
    """A freshly initialised model of ``size`` (initialisation seeded by ``seed``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config(config, size)).to(on or device())


def _meta_model(config: SweepConfig, size: str):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(config, size))


def num_params(config: SweepConfig, size: str) -> tuple[int, int | None]:
    """The planner's N (every parameter once, tied tensors once) and, for a mixture of experts, the
    active parameters (None for a dense size)."""
    model = _meta_model(config, size)
    return count_parameters(model), active_parameters(model)


def check_size(config: SweepConfig, size: str, qat: QATConfig) -> None:
    """Install the QAT layers on a meta-device model of ``size``: raises QATModelError (naming the
    layer) when ``group_size`` does not divide a width."""
    with torch.device("meta"):
        prepare_model_for_qat(_meta_model(config, size), qat)


def build_optimizer(model: torch.nn.Module, config: SweepConfig) -> torch.optim.AdamW:
    """AdamW as the Trainer builds it (weight decay on matrices only), the QAT scales (if installed)
    in their own group (no weight decay, LR ``SweepConfig.scale_peak_lr``)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and not name.endswith("log_scale_ratio") else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    add_scale_param_group(optimizer, model, config.scale_peak_lr)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def prepare_tail(model: torch.nn.Module, qat: QATConfig | None, config: SweepConfig) -> torch.optim.AdamW:
    """Install the (dormant) QAT layers of a tail, then build its optimizer."""
    if qat is not None:
        prepare_model_for_qat(model, qat)
    return build_optimizer(model, config)


def train_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SweepData,
    order: torch.Tensor,
    config: SweepConfig,
    multiplier: Callable[[int], float],
    start: int,
    stop: int,
    switch_step: int | None = None,
    on_step: Callable[[], None] | None = None,
) -> None:
    """Optimizer steps ``[start, stop)``: QAT turns on at ``switch_step`` (when it falls in range)."""
    model.train()
    on = next(model.parameters()).device
    params = [p for p in model.parameters()]
    for step in range(start, stop):
        if switch_step is not None and step == switch_step:
            activate_qat(model)
        factor = multiplier(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        batch = data.batch(order, step, config.batch_size).to(on)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step()


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over ``blocks`` ``[n, L]``."""
    model.eval()
    on = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size].to(on)
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                         reduction="sum"))
        count += batch[:, 1:].numel()
    model.train()
    return total / count


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Model state and AdamW state per parameter name, written atomically (a tmp file of this process,
    then rename: shards that write the same trunk checkpoint at once each replace it whole)."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    if optimizer is not None:
        state = {names[id(p)]: copy.deepcopy(s) for p, s in optimizer.state.items() if id(p) in names}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, "step": step, "model": model.state_dict(), "optimizer": state},
               f"{path}.{os.getpid()}.tmp")
    os.replace(f"{path}.{os.getpid()}.tmp", path)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Load a checkpoint written by :func:`save_checkpoint` into a model whose parameters are those
    of the checkpoint plus (optionally) QAT scales; returns its step."""
    try:
        checkpoint = torch.load(path, map_location="cpu")
    except Exception as exc:  # a truncated or foreign file
        raise RuntimeError(f"sweep checkpoint {path} cannot be read ({exc}); delete it and rerun the sweep") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"{path} is not a sweep checkpoint of format {CHECKPOINT_FORMAT}; delete it and rerun")
    missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
    missing = [k for k in missing if UNIT_KEY not in k]  # a tail's units: not in an FP trunk
    if missing or unexpected:
        raise RuntimeError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if optimizer is not None:
        params = dict(model.named_parameters())
        for name, state in checkpoint["optimizer"].items():
            param = params[name]  # AdamW keeps its step counts on the CPU
            optimizer.state[param] = {k: v if k == "step" else v.to(param.device) for k, v in state.items()}
    return int(checkpoint["step"])
