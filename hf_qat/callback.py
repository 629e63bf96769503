"""QATCallback: one callback that turns an ordinary Trainer run into FP training followed by QAT.

What it does, and when (transformers' Trainer, see INTEGRATION.md):

* ``on_init_end`` (inside ``Trainer.__init__``, before the optimizer exists and before DDP/FSDP2
  wrap the model): installs the dormant QAT modules (``prepare_model_for_qat``), and attaches to the
  Trainer that is being built so that the optimizer it creates holds the scales in their own
  param group (no weight decay, LR times ``scale_lr_multiplier``). The group exists from the first
  optimizer, so checkpoints of optimizer and scheduler state load back unchanged on resume. The
  callback also moves itself first in the callback list, so the ``qat/*`` values it adds to a log
  reach the reporting callbacks.
* ``on_train_begin``: resolves the switch step from ``start`` (an int step, a QAT fraction, or
  "auto"), checks the distributed setup, writes ``qat_config.json`` to the output dir.
* ``on_step_begin``: at the switch step, turns QAT on and initialises the scales from the full
  weights on every rank (optionally clears the optimizer state of the quantized weights).
* ``on_log``: adds ``qat/active`` and ``qat/weight_error``.
* ``on_save``: writes ``qat_config.json`` into the checkpoint folder.

Resuming: the switch state lives in the model (``qat_active`` / ``qat_initialized`` buffers and
the scales are in every checkpoint), and the switch step is recomputed from the config and
``max_steps``, so a run resumed from a checkpoint before or after the switch continues exactly.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import weakref
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import QATConfig
from .convert import (
    activate_qat,
    get_qat_config,
    is_qat_active,
    prepare_model_for_qat,
    qat_modules,
    quantization_error,
)
from .errors import QATConfigError, QATRuntimeError

logger = logging.getLogger("hf_qat")

SCALE_GROUP_KEY = "hf_qat_scales"


def scale_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The distinct learnable scale Parameters of a prepared model, in module order."""
    seen: dict[int, torch.nn.Parameter] = {}
    for _, module in qat_modules(model):
        scale = module.weight_scale
        if scale is not None and scale.requires_grad:
            seen.setdefault(id(scale), scale)
    return list(seen.values())


def add_scale_param_group(optimizer: torch.optim.Optimizer, model: torch.nn.Module, lr_multiplier: float) -> bool:
    """Move the scales of ``model`` out of the optimizer's groups into a group of their own
    (``weight_decay=0``, ``lr`` times ``lr_multiplier``, marked with ``hf_qat_scales=True``).

    Must run before a scheduler is built on the optimizer. Returns False when there is nothing to
    move (no scales, or the optimizer does not hold them).
    """
    scales = {id(p): p for p in scale_parameters(model)}
    groups = getattr(optimizer, "param_groups", None)
    if not scales or groups is None or any(g.get(SCALE_GROUP_KEY) for g in groups):
        return False
    template = None
    for group in groups:
        kept = [p for p in group["params"] if id(p) not in scales]
        if len(kept) != len(group["params"]):
            template = template or group
            group["params"] = kept
    if template is None:
        return False
    new_group = {k: v for k, v in template.items() if k != "params"}
    new_group.update(params=list(scales.values()), weight_decay=0.0, lr=template["lr"] * lr_multiplier)
    new_group[SCALE_GROUP_KEY] = True
    if "initial_lr" in new_group:
        new_group["initial_lr"] = template["initial_lr"] * lr_multiplier
    optimizer.add_param_group(new_group)
    return True


def resolve_switch_step(start: Any, max_steps: int) -> int:
    """The optimizer step at which QAT starts, for an int step or a float QAT fraction."""
    if max_steps <= 0:
        raise QATRuntimeError(f"cannot place the QAT switch: the run has max_steps={max_steps}")
    if isinstance(start, float):
        if start == 0.0:
            raise QATConfigError("start", start, "a QAT fraction in (0, 1]", detail="0.0 means no QAT: remove QATCallback")
        return int(round((1.0 - start) * max_steps))
    if isinstance(start, int):
        if start >= max_steps:
            raise QATConfigError(
                "start", start, f"a step below max_steps={max_steps}", detail="QAT would never run in this training run"
            )
        return start
    raise QATConfigError("start", start, "an int step or a float fraction once resolved")


def _constructing_trainer() -> Trainer | None:
    """The Trainer whose ``__init__`` is calling us (``on_init_end`` runs inside it), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


class QATCallback(TrainerCallback, ExportableState):
    """Train in full precision, then switch to QAT at the planned step.

    Pass it to the Trainer's constructor (``Trainer(..., callbacks=[QATCallback(cfg)])``): it must
    see the model before the optimizer is built and before DDP/FSDP2 wrap it.

    Args:
        config: a QATConfig, a dict of its fields, or a path to a ``qat_config.json``; None builds
            ``QATConfig(**overrides)``.
        **overrides: QATConfig fields applied on top of ``config``.
    """

    def __init__(self, config: QATConfig | dict | str | os.PathLike | None = None, **overrides: Any) -> None:
        if config is None:
            config = QATConfig(**overrides)
        elif isinstance(config, QATConfig):
            config = config.replace(**overrides) if overrides else config
        elif isinstance(config, dict):
            config = QATConfig.from_dict({**config, **overrides})
        elif isinstance(config, (str, os.PathLike)):
            config = QATConfig.from_pretrained(config)
            config = config.replace(**overrides) if overrides else config
        else:
            raise TypeError(f"QATCallback(config=...) takes a QATConfig, a dict or a path, got {type(config).__name__}")
        self.config: QATConfig = config
        self.switch_step: int | None = None
        self._trainer: weakref.ref[Trainer] | None = None

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> dict:
        return {"args": {"config": self.config.to_dict()}, "attributes": {"switch_step": self.switch_step}}

    # ------------------------------------------------------------------ lifecycle
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if model is None:
            raise QATRuntimeError("QATCallback.on_init_end got no model")
        prepare_model_for_qat(model, self.config)
        trainer = _constructing_trainer()
        if trainer is not None:
            self._attach(trainer)
        else:
            logger.warning("hf_qat: QATCallback is not inside a Trainer's __init__; the scales stay in the default param groups")

    def _attach(self, trainer: Trainer) -> None:
        if self._trainer is not None and self._trainer() is trainer:
            return
        original_create_optimizer = trainer.create_optimizer
        config = self.config

        def create_optimizer(model=None):
            was_built = trainer.optimizer is not None
            optimizer = original_create_optimizer(model)
            if not was_built:
                add_scale_param_group(optimizer, model if model is not None else trainer.model, config.scale_lr_multiplier)
            return optimizer

        trainer.create_optimizer = create_optimizer
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
            callbacks.insert(0, self)
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or get_qat_config(model) is None:
            raise QATRuntimeError(
                "the model holds no QAT modules: pass QATCallback to the Trainer's constructor "
                "(Trainer(..., callbacks=[QATCallback(cfg)])), not trainer.add_callback() after it, so that "
                "it can install them before the model is wrapped and the optimizer built"
            )
        self.switch_step = self._resolve_switch_step(state.max_steps)
        self._check_optimizer(optimizer)
        self._check_ddp()
        if is_qat_active(model) and state.global_step < self.switch_step:
            logger.warning(
                "hf_qat: the resumed model already has QAT on, but this config switches at step %d (now %d)",
                self.switch_step, state.global_step,
            )
        if state.is_world_process_zero:
            self._write_config(args.output_dir)
        logger.info("hf_qat: QAT starts at step %d of %d", self.switch_step, state.max_steps)

    def _resolve_switch_step(self, max_steps: int) -> int:
        if self.config.start == "auto":
            raise NotImplementedError(
                "QATConfig.start='auto' needs the planner; give start as an int step or a float QAT fraction"
            )
        return resolve_switch_step(self.config.start, max_steps)

    def _check_optimizer(self, optimizer) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if groups is not None and not any(g.get(SCALE_GROUP_KEY) for g in groups):
            logger.warning(
                "hf_qat: the scales are in the Trainer's default param groups (weight decay applies to them); "
                "pass QATCallback to the Trainer's constructor so it can give them their own group"
            )

    def _check_ddp(self) -> None:
        """Dormant scales get no gradient before the switch; DDP accepts that only with
        ``find_unused_parameters`` (the Trainer's default unless activation checkpointing is on)."""
        trainer = self._trainer() if self._trainer is not None else None
        wrapped = getattr(trainer, "model_wrapped", None)
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not (
            wrapped.find_unused_parameters or wrapped.static_graph
        ):
            raise QATRuntimeError(
                "DDP was built with find_unused_parameters=False, but the QAT scales receive no gradient "
                "before the switch step; set TrainingArguments(ddp_find_unused_parameters=True)"
            )

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.switch_step is None or state.global_step < self.switch_step or is_qat_active(model):
            return
        activate_qat(model)
        if self.config.reset_optimizer_state and optimizer is not None:
            self._reset_optimizer_state(model, optimizer)
        logger.info("hf_qat: QAT switched on at step %d", state.global_step)

    @staticmethod
    def _reset_optimizer_state(model, optimizer) -> None:
        weights = {id(module.weight) for _, module in qat_modules(model)}
        state = optimizer.state
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) in weights:
                    state.pop(param, None)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None or "loss" not in logs:
            return
        metrics = {"qat/active": float(is_qat_active(model))}
        if self.config.log_quant_error and metrics["qat/active"]:
            metrics["qat/weight_error"] = quantization_error(model)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step and "loss" in state.log_history[-1]:
            state.log_history[-1].update(metrics)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._write_config(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    def _write_config(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.config.save_pretrained(directory)
        with open(os.path.join(directory, "qat_state.json"), "w", encoding="utf-8") as fh:
            json.dump({"switch_step": self.switch_step}, fh, indent=2)
