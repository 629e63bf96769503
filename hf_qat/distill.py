"""Quantization-aware distillation: the full-precision model teaches the QAT model (QAT phase only).

``QATConfig(distill={"teacher": "switch", "weight": 0.5, "temperature": 1.0})``:

    loss = (1 - weight) * CE(student, labels) + weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

averaged over the predicted tokens (labels != -100), normalised like the Trainer's CE (over the
whole accumulated batch when the Trainer counts ``num_items_in_batch``), so gradient accumulation
and the CE term agree. Teachers:

* ``"switch"``: a frozen FP copy of the model taken at the switch step: the best FP model of a
  two-phase run. It is saved into every later checkpoint (``hf_qat_teacher.safetensors``) so a run
  resumed after the switch continues bit for bit;
* ``"initial"``: a frozen copy of the model as given to the Trainer;
* a model id or path (``AutoModelForCausalLM.from_pretrained``), or an ``nn.Module``.

With PEFT LoRA, "switch" and "initial" are the base model itself, run with the adapters disabled and
QAT off: no second copy. Optional memory savers: ``teacher_dtype`` ("bfloat16"/"float16") and
``top_k`` (the KL over the teacher's top-k tokens, renormalised). The teacher is held by the
callback, never by the model: it reaches neither the optimizer nor a checkpoint's model weights nor
an export.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dtypes import DTYPES, torch_dtype
from .errors import QATConfigError, QATModelError

SNAPSHOT_TEACHERS = ("switch", "initial")
DISTILL_KEYS = ("teacher", "weight", "temperature", "teacher_dtype", "top_k")
TEACHER_FILE = "hf_qat_teacher.safetensors"


@dataclass(frozen=True)
class DistillConfig:
    """The ``distill`` field of QATConfig (keys are the contract: add, never rename)."""

    teacher: Any = "switch"
    weight: float = 0.5
    temperature: float = 1.0
    teacher_dtype: str | None = None
    top_k: int | None = None

    @classmethod
    def from_value(cls, value: Any) -> "DistillConfig | None":
        """None, a DistillConfig or a dict of its keys -> a validated DistillConfig (or None)."""
        if value is None or isinstance(value, DistillConfig):
            return value
        if not isinstance(value, dict):
            raise QATConfigError("distill", value, "None or a dict with keys " + ", ".join(DISTILL_KEYS))
        unknown = sorted(set(value) - set(DISTILL_KEYS))
        if unknown:
            raise QATConfigError(f"distill.{unknown[0]}", value[unknown[0]], "keys " + ", ".join(DISTILL_KEYS))
        config = cls(**value)
        config.check()
        return config

    def check(self) -> None:
        teacher = self.teacher
        if teacher == "nn.Module":
            raise QATConfigError("distill.teacher", teacher, "the nn.Module itself (a saved config cannot hold it)")
        if not isinstance(teacher, (str, nn.Module)) or (isinstance(teacher, str) and not teacher):
            raise QATConfigError("distill.teacher", teacher, "'switch', 'initial', a model id or path, or an nn.Module")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not 0.0 <= self.weight <= 1.0:
            raise QATConfigError("distill.weight", self.weight, "a number in [0, 1]")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
            math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise QATConfigError("distill.temperature", self.temperature, "a finite number > 0")
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPES:
            raise QATConfigError("distill.teacher_dtype", self.teacher_dtype, "None, " + ", ".join(DTYPES))
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise QATConfigError("distill.top_k", self.top_k, "None or an int >= 1")

    def to_dict(self) -> dict[str, Any]:
        teacher = "nn.Module" if isinstance(self.teacher, nn.Module) else self.teacher
        return {"teacher": teacher, "weight": self.weight, "temperature": self.temperature,
                "teacher_dtype": self.teacher_dtype, "top_k": self.top_k}


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float, top_k: int | None = None, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` summed over the predicted tokens, divided by ``num_items``
    (default: their count).

    Shapes: logits ``[B, L, V]`` (position t predicts token t + 1), labels ``[B, L]`` with -100 for
    tokens that are not predicted, as the causal-LM loss of transformers reads them.
    """
    s = student_logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    keep = labels[:, 1:] != -100
    s, t = s[keep], t[keep]  # [N, V]
    log_p_s = F.log_softmax(s, dim=-1)
    if top_k is not None and top_k < t.shape[-1]:
        t, index = t.topk(top_k, dim=-1)
        log_p_s = log_p_s.gather(-1, index)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    count = num_items if num_items is not None else keep.sum()
    return kl * temperature ** 2 / count


class Teacher:
    """The teacher of a distilled QAT run: builds it, runs it, saves and restores a snapshot."""

    def __init__(self, config: DistillConfig) -> None:
        self.config = config
        self.module: nn.Module | None = None
        self.use_peft_base = False

    # ------------------------------------------------------------------ building
    def snapshot(self, model: nn.Module) -> None:
        """A frozen FP copy of ``model`` (its QAT layers removed), or with PEFT the base model itself."""
        from .convert import remove_qat

        if _is_peft(model):
            self.use_peft_base = True
            return
        if any(_is_dtensor(p) for p in model.parameters()):
            raise QATModelError("distillation from a snapshot is not supported under FSDP2 (the teacher would be a "
                                "second sharded model); pass a teacher model, or train without FSDP2")
        snapshot = copy.deepcopy(model)
        remove_qat(snapshot)
        self.module = self._freeze(snapshot)

    def load_external(self, model: nn.Module) -> None:
        """The teacher named by a model id or path, or given as an nn.Module."""
        teacher = self.config.teacher
        if isinstance(teacher, str):
            from transformers import AutoModelForCausalLM

            teacher = AutoModelForCausalLM.from_pretrained(teacher)
        self.module = self._freeze(teacher.to(next(model.parameters()).device))
        check_vocabulary(self.module, model)

    def _freeze(self, module: nn.Module) -> nn.Module:
        module.requires_grad_(False)
        module.eval()
        if self.config.teacher_dtype is not None:
            module.to(torch_dtype(self.config.teacher_dtype))
        return module

    @property
    def ready(self) -> bool:
        return self.module is not None or self.use_peft_base

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def logits(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The teacher's logits for the student's batch (``labels`` are not passed)."""
        kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        if self.use_peft_base:
            from .convert import set_qat_active

            with model.disable_adapter():
                set_qat_active(model, False)
                try:
                    return model(**kwargs).logits
                finally:
                    set_qat_active(model, True)
        return self.module(**kwargs).logits

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str) -> None:
        """Write a snapshot teacher into a checkpoint folder (nothing for PEFT bases and external teachers)."""
        if self.module is None or self.config.teacher not in SNAPSHOT_TEACHERS:
            return
        from safetensors.torch import save_model

        os.makedirs(directory, exist_ok=True)
        save_model(self.module, os.path.join(directory, TEACHER_FILE))

    def restore(self, model: nn.Module, directory: str) -> None:
        """The snapshot saved by :meth:`save` in ``directory`` (raises when it is missing)."""
        path = os.path.join(directory, TEACHER_FILE)
        if not os.path.isfile(path):
            raise QATModelError(
                f"resuming after the switch with distill teacher 'switch' needs the teacher snapshot {path}; "
                "resume from a checkpoint that a distilled run saved in output_dir"
            )
        from safetensors.torch import load_model

        from .convert import remove_qat

        shell = copy.deepcopy(model)
        remove_qat(shell)
        self.module = self._freeze(shell)
        load_model(self.module, path, strict=True)


def check_vocabulary(teacher: nn.Module, student: nn.Module) -> None:
    """A teacher must score the student's vocabulary: same output size."""
    def vocab(m: nn.Module) -> int | None:
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        return None if head is None else int(head.weight.shape[0])

    if vocab(teacher) != vocab(student):
        raise QATModelError(f"the distillation teacher predicts {vocab(teacher)} tokens but the student {vocab(student)}: "
                            "use a teacher with the student's tokenizer and vocabulary")


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from .distributed import is_dtensor

    return is_dtensor(tensor)
