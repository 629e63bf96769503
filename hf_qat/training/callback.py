"""QATCallback: one callback that turns an ordinary Trainer run into FP training followed by QAT.

What it does, and when (transformers' Trainer; how it reaches into it: :mod:`hf_qat.training.trainer_hooks`):

* ``on_init_end`` (inside ``Trainer.__init__``, before the optimizer exists and before DDP/FSDP2
  wrap the model): installs the dormant QAT modules (``prepare_model_for_qat``) and attaches to the
  Trainer being built:
    - the optimizer it creates holds the scales in their own param group (no weight decay, LR
      ``QATConfig.scale_peak_lr``: ``scale_lr``, 0.02 by default);
    - the scheduler it creates is the two-phase schedule (fused cooldown by default) around the
      planned switch step, unless ``manage_schedule=False``;
  both exist from the start, so optimizer and scheduler checkpoints load back unchanged on resume.
  The callback also moves itself first in the callback list, so the ``qat/*`` values it adds to a
  log reach the reporting callbacks.
* When the scheduler is built (or at ``on_train_begin``): the plan. ``start="auto"`` asks the
  planner (:func:`hf_qat.plan_qat`) with N = the model's parameters (tied tensors once; or only the
  quantized weights with ``count_quantized_params_only``) and tokens per step =
  ``per_device_train_batch_size * gradient_accumulation_steps * world_size`` x the tokens per example:
  ``QATConfig.sequence_length``, or the mean real tokens of sampled training examples
  (:mod:`hf_qat.training.run_inputs`; the plan says which). The plan is logged and written to
  ``qat_plan.json`` in the output dir.
* ``on_step_begin``: at the switch step, turns QAT on and initialises the scales from the full
  weights on every rank (optionally clears the optimizer state of the quantized weights).
* ``on_log``: adds ``qat/active`` and ``qat/weight_error``, the mean relative quantization error
  measured at the switch and at each evaluation (``trainer.evaluate()`` returns it as
  ``eval_qat/weight_error``; the next training log reports it):
  a log never costs a pass over the weights.
* ``on_save``: writes ``qat_config.json`` and ``qat_plan.json`` into the checkpoint folder (and, for
  a PEFT model, whose checkpoints hold only the adapter, the QAT state: :mod:`hf_qat.training.qat_state`; with
  a snapshot teacher, the teacher).

Resuming: the switch state lives in the model (the units' ``active`` / ``initialized`` buffers and
the scales are in every checkpoint), the Trainer's checkpoint loading also loads the QAT state of a
PEFT checkpoint and a distilled run's teacher, and the plan is recomputed from the same config,
arguments and data, so a run resumed from a checkpoint before or after the switch continues exactly.

The callback orchestrates; the work is elsewhere: installing (:mod:`hf_qat.model.convert`), the scales'
param group (:mod:`hf_qat.training.optim`), N and tokens per step (:mod:`hf_qat.training.run_inputs`), the plan
(:mod:`hf_qat.planner`), the schedule (:mod:`hf_qat.schedule`), the distillation loss
(:mod:`hf_qat.training.distill`), and the hooks into the Trainer (:mod:`hf_qat.training.trainer_hooks`).
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import CONFIG_NAME, QATConfig
from ..errors import QATConfigError, QATModelError, QATRuntimeError
from ..jsonio import write_json
from ..model.convert import activate_qat, get_qat_config, is_qat_active, prepare_model_for_qat, quantization_error
from ..model.distributed import is_dtensor
from ..model.file_type import mean_storage_bits
from ..model.lora import is_peft_model
from ..model.unit import UNIT_KEY
from ..planner import Plan, QATScalingLaw, plan_qat
from ..schedule import lambda_lr, make_schedule
from .checkpoint import restore_converted_weights
from .distill import DistillationLoss, Teacher
from .fused_heads import check_fused_head
from .optim import SCALE_GROUP_KEY, add_scale_param_group, has_scale_group, reset_weight_state, scale_parameters
from .qat_state import STATE_FILE, load_unit_state, save_unit_state
from .run_inputs import active_parameters, count_parameters, tokens_per_step
from .trainer_hooks import TrainerHooks, attach, constructing_trainer, guard_resume

logger = logging.getLogger("hf_qat")

__all__ = ["QATCallback", "SCALE_GROUP_KEY", "resolve_switch_step"]
PLAN_NAME = "qat_plan.json"


def resolve_switch_step(start: Any, max_steps: int) -> int:
    """The optimizer step at which QAT starts, for an int step or a float QAT fraction."""
    if max_steps <= 0:
        raise QATRuntimeError(f"cannot place the QAT switch: the run has max_steps={max_steps}")
    if isinstance(start, float):
        return min(int(round((1.0 - start) * max_steps)), max_steps - 1)
    if isinstance(start, int):
        if start >= max_steps:
            raise QATConfigError(
                "start", start, f"a step below max_steps={max_steps}", detail="QAT would never run in this training run"
            )
        return start
    raise QATConfigError("start", start, "an int step or a float fraction once resolved")


def _resume_without_callback(trainer: Trainer, directory: str) -> Exception | None:
    """A QAT run's checkpoint resumed by a Trainer that has no QATCallback: the error that says so."""
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)) or any(
            isinstance(cb, QATCallback) for cb in trainer.callback_handler.callbacks):
        return None
    return QATRuntimeError(
        f"{directory} is a checkpoint of a QAT run ({CONFIG_NAME}), but this Trainer has no QATCallback: its QAT "
        f"scales and switch state have nowhere to go. Resume with Trainer(..., callbacks=[QATCallback({directory!r})]) "
        "(the checkpoint's config), or export it (hf-qat export) to use the quantized model")


class QATCallback(TrainerCallback, ExportableState):
    """Train in full precision, then switch to QAT at the planned step.

    Pass it to the Trainer's constructor (``Trainer(..., callbacks=[QATCallback(cfg)])``): it must
    see the model before the optimizer is built and before DDP/FSDP2 wrap it.

    Args:
        config: a QATConfig, a dict of its fields, or a path to a ``qat_config.json``; None builds
            ``QATConfig(**overrides)``.
        **overrides: QATConfig fields applied on top of ``config``.

    Attributes:
        switch_step: the optimizer step at which QAT starts (known once training begins).
        plan: the :class:`hf_qat.planner.Plan` of the run (None when it could not be computed).
        switched: whether this run has passed the switch step (set at the first step at or after it).
        weight_error: the mean relative quantization error, measured at the switch and at each evaluation.
        teacher / distillation: with ``QATConfig(distill=...)``, the :class:`hf_qat.training.distill.Teacher` and the
            :class:`hf_qat.training.distill.DistillationLoss` the Trainer's loss goes through.
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
        if config.law_path is not None and not os.path.isfile(config.law_path):
            raise QATConfigError("law_path", config.law_path, "None or the path of an existing fitted law JSON "
                                 "(hf-qat fit RUNS.jsonl -o law.json)")
        self.config: QATConfig = config
        self.switch_step: int | None = None
        self.plan: Plan | None = None
        self.planned_steps: int | None = None  # the max_steps the plan was made for
        self.switched = False
        self.weight_error: float | None = None
        distill = config.distill_config
        self.teacher: Teacher | None = Teacher(distill) if distill is not None else None
        self.distillation = DistillationLoss(self.teacher) if self.teacher is not None else None
        self._trainer: weakref.ref[Trainer] | None = None

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> dict:
        return {"args": {"config": self.config.to_dict()}, "attributes": {"switch_step": self.switch_step}}

    # ------------------------------------------------------------------ attaching to the Trainer
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if model is None:
            raise QATRuntimeError("QATCallback.on_init_end got no model")
        if self.teacher is not None and not self.teacher.ready:
            if self.teacher.config.teacher == "initial":
                self.teacher.snapshot(model)  # before the QAT layers are installed
            elif self.teacher.config.teacher != "switch":
                self.teacher.load_external(model)
        prepare_model_for_qat(model, self.config)
        check_fused_head(model, args, self.config)
        trainer = constructing_trainer()
        if trainer is None:
            logger.warning("hf_qat: QATCallback is not inside a Trainer's __init__; the scales stay in the default "
                           "param groups and the Trainer's LR schedule is kept")
            return
        if self._trainer is not None and self._trainer() is trainer:
            return
        config = self.config

        def build_scheduler(num_training_steps: int, optimizer):
            self._resolve(trainer.args, num_training_steps, trainer.model, trainer.train_dataset)
            multiplier = make_schedule(
                num_training_steps, self.switch_step, warmup_steps=trainer.args.get_warmup_steps(num_training_steps),
                fuse_cooldown=config.fuse_cooldown, decay_shape=config.decay_shape, min_lr_ratio=config.min_lr_ratio,
                fp_cooldown_fraction=config.fp_cooldown_fraction, qat_warmup_fraction=config.qat_warmup_fraction,
            )
            return lambda_lr(optimizer, multiplier)

        distillation, unwrapped = self.distillation, model  # a PEFT teacher runs the unwrapped model

        def compute_loss(original, wrapped, inputs, return_outputs, num_items_in_batch):
            return distillation(trainer, original, unwrapped, wrapped, inputs, return_outputs, num_items_in_batch)

        attach(trainer, self, TrainerHooks(
            add_scale_group=lambda optimizer, m: add_scale_param_group(optimizer, m, config.scale_peak_lr),
            build_scheduler=build_scheduler if config.manage_schedule else None,
            compute_loss=compute_loss if distillation is not None else None,
            load_checkpoint=self._load_checkpoint,
            check_checkpoint=self._check_checkpoint,
        ))
        self._trainer = weakref.ref(trainer)

    def _check_checkpoint(self, directory: str, model: torch.nn.Module) -> None:
        """Before the Trainer resumes from ``directory``: it must be a checkpoint of a QAT run saved with this
        run's QATConfig (a difference would resume silently on other grids, or die in a shape mismatch)."""
        if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
            raise QATRuntimeError(
                f"{directory} holds no {CONFIG_NAME}: it is not a checkpoint of a QAT run, so there is no QAT state "
                f"to resume. To QAT-train from its weights, start a new run: model = "
                f"AutoModelForCausalLM.from_pretrained({directory!r}), then Trainer(model=model, ..., "
                "callbacks=[QATCallback(cfg)]).train() without resume_from_checkpoint")
        differ = self.config.differences(QATConfig.from_pretrained(directory))
        if differ:
            listed = "; ".join(f"{name}: {saved!r} in the checkpoint, {ours!r} in this run"
                               for name, (ours, saved) in differ.items())
            first, (ours, saved) = next(iter(differ.items()))
            raise QATConfigError(
                first, ours, f"{saved!r}, as the checkpoint {directory} was saved with",
                detail=f"Differences: {listed}. Resume with the saved config, QATCallback({directory!r}) (it reads "
                       f"its {CONFIG_NAME}), or start a new run from its weights with "
                       f"AutoModelForCausalLM.from_pretrained({directory!r}) and no resume_from_checkpoint")

    def _load_checkpoint(self, directory: str, model: torch.nn.Module) -> None:
        """What the Trainer's checkpoint loading leaves out: a PEFT checkpoint's QAT state (its scales
        and switch); tensors saved in the original format that its plain load_state_dict cannot place
        (MoE experts, renamed units: :mod:`hf_qat.training.checkpoint`); a distilled run's teacher snapshot."""
        if is_peft_model(model):
            if not load_unit_state(model, directory):
                logger.warning("hf_qat: %s holds no %s (a PEFT checkpoint of hf_qat < 0.4?): the QAT scales and "
                               "switch state restart from the switch, so this resume is not exact", directory, STATE_FILE)
        else:
            converted = [key for key in restore_converted_weights(model, directory) if UNIT_KEY not in key]
            if converted:
                logger.info("hf_qat: %d tensors of %s stored in the original (per-expert) format were loaded as "
                            "from_pretrained converts them", len(converted), directory)
        if self.teacher is not None:
            self.teacher.restore(model, directory)

    # ------------------------------------------------------------------ the plan
    def _resolve(self, args: TrainingArguments, max_steps: int, model, train_dataset) -> None:
        """Set ``switch_step`` (and ``plan``) for a run of ``max_steps`` optimizer steps."""
        if self.planned_steps == max_steps:
            return
        cfg = self.config
        tps = None
        if cfg.sequence_length is not None or train_dataset is not None:
            try:
                tps = tokens_per_step(args, cfg.sequence_length, train_dataset)
            except QATConfigError:
                if cfg.start == "auto":
                    raise
        fixed = None if cfg.start == "auto" else resolve_switch_step(cfg.start, max_steps)
        if fixed is None and tps is None:
            raise QATConfigError("sequence_length", None, "the tokens per training example",
                                 detail="start='auto' needs the tokens per step: set it, or pass a train_dataset")
        self.plan = None
        if tps is not None:
            active = active_parameters(model, cfg.count_quantized_params_only)
            if cfg.moe_params == "active" and active is None:
                raise QATConfigError("moe_params", "active", "'total' for this model",
                                     detail="it has no experts, so every parameter is active")
            self.plan = plan_qat(
                count_parameters(model, cfg.count_quantized_params_only), tps.tokens * max_steps, cfg.bits,
                active_params=active, moe_params=cfg.moe_params, method=cfg.resolved_method,
                storage_bits=mean_storage_bits(model) if cfg.gguf_mix else None,
                total_steps=max_steps, tokens_per_step=tps.tokens, pretrained_tokens=cfg.pretrained_tokens,
                law=QATScalingLaw.load(cfg.law_path) if cfg.law_path else None,
                strategy=cfg.strategy if fixed is None else "fixed",
                fraction=None if fixed is None else (max_steps - fixed) / max_steps,
                tokens_per_step_source=tps.source,
            )
            if tps.warning is not None:
                self.plan.warnings.append(tps.warning)
            source = getattr(model, "name_or_path", "")
            if fixed is None and cfg.pretrained_tokens is None and source:
                self.plan.warnings.append(
                    f"the model comes from {source!r} and QATConfig.pretrained_tokens is unset, so the plan takes this "
                    f"run for the model's whole training and puts QAT on its last {self.plan.run_qat_fraction:.1%}. If "
                    "its weights are pretrained (from_pretrained, not a config trained from scratch), set "
                    "pretrained_tokens (the tokens it was pretrained on, e.g. '2T'): the plan then counts them, and runs "
                    "QAT from step 0 when the optimum wants more QAT tokens than the run has")
            if fixed is not None:
                self.plan.switch_step = fixed
        self.switch_step = self.plan.switch_step if fixed is None else fixed
        self.planned_steps = max_steps

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is None or get_qat_config(model) is None:
            raise QATRuntimeError(
                "the model holds no QAT modules: pass QATCallback to the Trainer's constructor "
                "(Trainer(..., callbacks=[QATCallback(cfg)])), not trainer.add_callback() after it, so that "
                "it can install them before the model is wrapped and the optimizer built"
            )
        check_fused_head(model, args, self.config)  # TRL's fused head and Liger's loss are in place only now
        dataset = getattr(train_dataloader, "dataset", None)
        self._resolve(args, state.max_steps, model, dataset)
        if self.teacher is not None and self.teacher.config.teacher in ("switch", "initial") and any(
                is_dtensor(p) for p in model.parameters()):
            raise QATModelError("distill teacher 'switch'/'initial' is a copy of the model, which FSDP2 shards: pass a "
                                "teacher model (an id, a path or an nn.Module), or train with DDP")
        if self.teacher is not None and self.teacher.config.teacher == "switch" and self.switch_step == 0:
            raise QATConfigError("distill.teacher", "switch", "'initial', a model id or path, or an nn.Module",
                                 detail="the planned switch is step 0: there is no FP phase to snapshot")
        self.switched = False
        if self.distillation is not None:
            self.distillation.active = False
        self._check_optimizer(optimizer, model)
        self._check_ddp()
        if is_qat_active(model) and state.global_step < self.switch_step:
            logger.warning(
                "hf_qat: the model already has QAT on at step %d (activated before training, or resumed from a QAT "
                "checkpoint), but this config switches at step %d: it trains with QAT from now on, and the plan "
                "describes the planned switch", state.global_step, self.switch_step,
            )
        if self.plan is not None:
            logger.info("hf_qat plan: %s", self.plan.summary())
            for warning in self.plan.warnings:
                logger.warning("hf_qat plan: %s", warning)
        else:
            logger.info("hf_qat: QAT starts at step %d of %d", self.switch_step, state.max_steps)
        if state.is_world_process_zero:
            self._write_files(args.output_dir, state.max_steps)

    def _check_optimizer(self, optimizer, model) -> None:
        if optimizer is not None and scale_parameters(model) and not has_scale_group(optimizer):
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
        if self.switched or self.switch_step is None or state.global_step < self.switch_step:
            return
        self.switched = True
        resumed = is_qat_active(model)
        if self.teacher is not None and self.teacher.config.teacher == "switch" and not self.teacher.ready:
            if resumed:
                raise QATModelError(
                    "resuming after the switch with distill teacher 'switch' needs the teacher snapshot "
                    "(hf_qat_teacher.safetensors) in the checkpoint; resume from a checkpoint that the distilled run saved"
                )
            self.teacher.snapshot(model)  # the FP model at the switch, before QAT turns on
        if not resumed:
            activate_qat(model)
            if self.config.reset_optimizer_state and optimizer is not None:
                reset_weight_state(model, optimizer)
            logger.info("hf_qat: QAT switched on at step %d", state.global_step)
        if self.distillation is not None:
            self.distillation.active = True
        if self.config.log_quant_error:
            self.weight_error = quantization_error(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        """Adds ``qat/active`` and the last measured ``qat/weight_error`` (no pass over the weights), and
        with distillation ``qat/ce_loss`` / ``qat/distill_loss``."""
        if logs is None or model is None or "loss" not in logs:
            return
        metrics = {"qat/active": float(is_qat_active(model))}
        if self.config.log_quant_error and metrics["qat/active"] and self.weight_error is not None:
            metrics["qat/weight_error"] = self.weight_error
        if self.distillation is not None and self._trainer is not None:
            metrics.update(self.distillation.pop_logs(self._trainer()))
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step and "loss" in state.log_history[-1]:
            state.log_history[-1].update(metrics)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        """Measures the weight error (one pass over the quantized weights, on every rank) at evaluation."""
        if self.config.log_quant_error and model is not None and is_qat_active(model):
            self.weight_error = quantization_error(model)
            if metrics is not None:
                metrics["eval_qat/weight_error"] = self.weight_error

    def on_save(self, args, state, control, model=None, **kwargs):
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if model is not None and is_peft_model(model):  # every rank: gathered under FSDP2
            save_unit_state(model, directory, write=state.is_world_process_zero)
        if state.is_world_process_zero:
            self._write_files(directory, state.max_steps)
            if self.teacher is not None:
                self.teacher.save(directory)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """With ``load_best_model_at_end`` the Trainer reloads the best checkpoint with its own loader,
        which leaves out what :meth:`_load_checkpoint` adds: load it. A PEFT run's output dir gets the
        final QAT state (the Trainer's ``save_model`` saves only the adapter and has no event)."""
        if model is None:
            return
        if args.load_best_model_at_end and state.best_model_checkpoint:
            self._load_checkpoint(state.best_model_checkpoint, model)
        if is_peft_model(model):  # every rank: gathered under FSDP2
            save_unit_state(model, args.output_dir, write=state.is_world_process_zero)

    def _write_files(self, directory: str, max_steps: int) -> None:
        os.makedirs(directory, exist_ok=True)
        self.config.save_pretrained(directory)
        plan = self.plan.to_dict() if self.plan is not None else {"switch_step": self.switch_step, "total_steps": max_steps}
        write_json(os.path.join(directory, PLAN_NAME), plan)


guard_resume(_resume_without_callback)
