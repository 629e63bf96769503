"""How QATCallback reaches into the Trainer that is being built, and why.

A TrainerCallback only receives events; four things hf_qat needs happen inside ``Trainer`` methods
that no event covers:

1. The optimizer must hold the scales in a param group of their own (no weight decay, their own LR)
   *when it is built*, so that an optimizer checkpoint loads back into the same groups on resume.
   ``Trainer.create_optimizer`` builds it after every callback event of ``__init__``.
2. The LR schedule must be the two-phase one (fused cooldown) from the first step, so that a
   scheduler checkpoint resumes it. ``Trainer.create_scheduler`` builds it, again with no event.
3. With ``QATConfig(distill=...)`` the QAT phase's loss mixes in the teacher's KL term, which needs
   the batch's inputs: ``Trainer.compute_loss`` is the one place that has them (a
   ``compute_loss_func`` sees only the outputs and labels).
4. Resuming must load what the Trainer's checkpoint loading leaves out: a PEFT checkpoint holds only
   the adapter (not the QAT scales and switch state), and a distilled run's teacher snapshot. The
   checkpoint folder is known only inside ``Trainer._load_from_checkpoint`` (no event carries it), which
   is also where the checkpoint is checked against the run before anything loads (the saved QATConfig
   against the run's, a checkpoint of a run without QAT).

One guard acts on every Trainer once hf_qat is imported (:func:`guard_resume`): resuming a checkpoint of a
QAT run in a Trainer without QATCallback is refused with the fix, instead of the optimizer's "different
number of parameter groups" after the QAT tensors were dropped.

So at ``on_init_end`` (which ``Trainer.__init__`` calls, before the optimizer, the scheduler and the
DDP/FSDP2 wrap exist) the callback finds the Trainer whose ``__init__`` is running by walking the
call stack (:func:`constructing_trainer`; the event carries the model but not the Trainer) and wraps
those methods on that instance only (:func:`attach`). Everything else goes through ordinary
events. Tested with transformers 5.x (5.24 in CI). Without a Trainer in the stack (a callback added
later, or another training loop), nothing is wrapped and the callback says so.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import Trainer


def constructing_trainer() -> Trainer | None:
    """The Trainer whose ``__init__`` is on the call stack (``on_init_end`` runs inside it), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


@dataclass(frozen=True)
class TrainerHooks:
    """What :func:`attach` adds to a Trainer's methods (None: the Trainer's own behaviour).

    Attributes:
        add_scale_group: ``(optimizer, model)``: moves the scales into their own group of a new optimizer.
        build_scheduler: ``(num_training_steps, optimizer) -> scheduler``.
        compute_loss: ``(original_compute_loss, model, inputs, return_outputs, num_items_in_batch) ->
            loss [, outputs]``.
        load_checkpoint: ``(checkpoint_dir, model)``, called after the Trainer loaded a checkpoint's weights.
        check_checkpoint: ``(checkpoint_dir, model)``, called before the Trainer loads a checkpoint (raises to
            refuse it).
    """

    add_scale_group: Callable[[torch.optim.Optimizer, torch.nn.Module], object]
    build_scheduler: Callable[[int, torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None
    compute_loss: Callable | None = None
    load_checkpoint: Callable[[str, torch.nn.Module], None] | None = None
    check_checkpoint: Callable[[str, torch.nn.Module], None] | None = None


def attach(trainer: Trainer, callback, hooks: TrainerHooks) -> None:
    """Wrap ``trainer``'s optimizer and scheduler factories, its loss and its checkpoint loading as
    ``hooks`` say, and move ``callback`` first in its list."""
    original_create_optimizer = trainer.create_optimizer
    original_create_scheduler = trainer.create_scheduler

    def create_optimizer(model=None):
        was_built = trainer.optimizer is not None
        optimizer = original_create_optimizer(model)
        if not was_built:
            hooks.add_scale_group(optimizer, model if model is not None else trainer.model)
        return optimizer

    def create_scheduler(num_training_steps: int, optimizer=None):
        if hooks.build_scheduler is None or trainer.lr_scheduler is not None:
            return original_create_scheduler(num_training_steps, optimizer)
        trainer.lr_scheduler = hooks.build_scheduler(num_training_steps,
                                                     optimizer if optimizer is not None else trainer.optimizer)
        trainer._created_lr_scheduler = True  # the Trainer's own flag: it then steps and saves the scheduler
        return trainer.lr_scheduler

    trainer.create_optimizer = create_optimizer
    trainer.create_scheduler = create_scheduler
    if hooks.compute_loss is not None:
        original_compute_loss = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            return hooks.compute_loss(original_compute_loss, model, inputs, return_outputs, num_items_in_batch)

        trainer.compute_loss = compute_loss
    if hooks.load_checkpoint is not None:
        original_load = trainer._load_from_checkpoint

        def load_from_checkpoint(resume_from_checkpoint, model=None):
            if hooks.check_checkpoint is not None:
                hooks.check_checkpoint(resume_from_checkpoint, trainer.model)
            original_load(resume_from_checkpoint, model)
            hooks.load_checkpoint(resume_from_checkpoint, trainer.model)

        trainer._load_from_checkpoint = load_from_checkpoint
    callbacks = trainer.callback_handler.callbacks
    if callback in callbacks:  # first, so the qat/* values it adds to a log reach the reporters
        callbacks.remove(callback)
        callbacks.insert(0, callback)


def guard_resume(refusal: Callable[[Trainer, str], Exception | None]) -> None:
    """Wrap ``Trainer._load_from_checkpoint`` (the class's, once) so that ``refusal(trainer, checkpoint_dir)``
    may refuse a checkpoint before any Trainer loads it (the instance wrappers of :func:`attach` call it too)."""
    load = Trainer._load_from_checkpoint
    if getattr(load, "hf_qat_guard", False):
        return

    @functools.wraps(load)
    def guarded(self, resume_from_checkpoint, model=None):
        error = refusal(self, resume_from_checkpoint)
        if error is not None:
            raise error
        return load(self, resume_from_checkpoint, model)

    guarded.hf_qat_guard = True
    Trainer._load_from_checkpoint = guarded
