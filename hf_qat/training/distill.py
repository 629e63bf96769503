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
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MODULE_TEACHER, SNAPSHOT_TEACHERS, DistillConfig
from ..dtypes import torch_dtype
from ..errors import QATConfigError, QATModelError
from ..model.distributed import is_dtensor
from ..model.lora import is_peft_model

TEACHER_FILE = "hf_qat_teacher.safetensors"
# Elements of one chunk of [positions, vocabulary] fp32 work (16 MiB): the KL's temporaries stay this
# small whatever the batch, and a chunk is still large enough for the vectorised math to dominate.
CHUNK_ELEMENTS = 1 << 22


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               temperature: float, top_k: int | None = None, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` summed over the predicted tokens, divided by ``num_items``
    (default: their count).

    Shapes: logits ``[B, L, V]`` (position t predicts token t + 1), labels ``[B, L]`` with -100 for
    tokens that are not predicted, as the causal-LM loss of transformers reads them. With ``top_k``
    the teacher's distribution is its ``top_k`` largest logits, renormalised, against the student's
    full-vocabulary log-probabilities there.

    Memory: the KL and its gradient are computed in chunks of positions (:data:`CHUNK_ELEMENTS`
    fp32 elements each, after Liger-Kernel's chunked distillation losses), and the gradient w.r.t. the
    student's logits is written into one ``[B, L, V]`` buffer during the forward pass, so the loss
    adds that buffer, its scaled copy in the backward pass and the chunks' temporaries (measured 2.0 to
    2.5 logits-sized buffers, benchmarks/distill_memory.py --loss-only), not seven full fp32 copies.
    """
    return _ChunkedKL.apply(student_logits, teacher_logits, labels, float(temperature), top_k, num_items)


class _ChunkedKL(torch.autograd.Function):
    """:func:`distill_kl`: the value and d/d(student logits) in one chunked pass.

    Per predicted position, with ``q = softmax(z_s / T)`` and the teacher's ``p`` (full or top-k,
    renormalised, zero elsewhere): ``KL = sum p (log p - log q)`` and ``dKL/dz_s = (q - p) / T``
    (``sum p = 1``), so ``d loss / d z_s = T / num_items * (q - p)``.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, temperature, top_k, num_items):
        keep = labels[:, 1:] != -100  # [B, L - 1]: position t predicts token t + 1
        count = keep.sum() if num_items is None else num_items
        vocab = student_logits.shape[-1]
        chunk = max(1, CHUNK_ELEMENTS // vocab)
        full_vocab = top_k is None or top_k >= teacher_logits.shape[-1]
        grad = torch.zeros_like(student_logits) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        length = student_logits.shape[1]
        predicted = keep.flatten().nonzero().squeeze(1)  # flat positions b * (L - 1) + t, one host sync
        predicted = predicted // (length - 1) * length + predicted % (length - 1)  # into the [B * L] rows
        student_rows = student_logits.reshape(-1, vocab)
        teacher_rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        grad_rows = None if grad is None else grad.view(-1, vocab)
        for start in range(0, predicted.numel(), chunk):
            index = predicted[start:start + chunk]
            log_q = F.log_softmax(student_rows.index_select(0, index).float() / temperature, dim=-1)
            t = teacher_rows.index_select(0, index).float() / temperature
            if full_vocab:
                log_p = F.log_softmax(t, dim=-1)
                p = log_p.exp()
                total += (p * (log_p - log_q)).sum()
                q_minus_p = log_q.exp_().sub_(p) if grad is not None else None
            else:
                top, top_index = t.topk(top_k, dim=-1)
                log_p = F.log_softmax(top, dim=-1)
                p = log_p.exp()
                total += (p * (log_p - log_q.gather(-1, top_index))).sum()
                q_minus_p = log_q.exp_().scatter_add_(-1, top_index, -p) if grad is not None else None
            if grad is not None:
                grad_rows.index_copy_(0, index, q_minus_p.to(grad.dtype))
        if grad is not None:
            grad.mul_(temperature / count)
            ctx.save_for_backward(grad)
        return total * temperature ** 2 / count

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


class Teacher:
    """The teacher of a distilled QAT run: builds it, runs it, saves and restores a snapshot."""

    def __init__(self, config: DistillConfig) -> None:
        self.config = config
        self.module: nn.Module | None = None
        self.use_peft_base = False

    # ------------------------------------------------------------------ building
    def snapshot(self, model: nn.Module) -> None:
        """A frozen FP copy of ``model`` (its QAT layers removed), or with PEFT the base model itself."""
        from ..model.convert import remove_qat

        if is_peft_model(model):
            self.use_peft_base = True
            return
        if any(is_dtensor(p) for p in model.parameters()):
            raise QATModelError("distillation from a snapshot is not supported under FSDP2 (the teacher would be a "
                                "second sharded model); pass a teacher model, or train without FSDP2")
        snapshot = copy.deepcopy(model)
        remove_qat(snapshot)
        self.module = self._freeze(snapshot)

    def load_external(self, model: nn.Module) -> None:
        """The teacher named by a model id or path, or given as an nn.Module."""
        teacher = self.config.teacher
        if teacher == MODULE_TEACHER:
            raise QATConfigError("distill.teacher", teacher, "'switch', 'initial', a model id or path, or the "
                                 "nn.Module itself", detail="this config was read back from a file, which cannot hold "
                                 "a module: pass QATCallback(config, distill={..., 'teacher': module})")
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
            from ..model.convert import set_qat_active

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

    def restore(self, model: nn.Module, directory: str) -> bool:
        """Load the snapshot :meth:`save` wrote into ``directory``, if it holds one (a checkpoint
        after the switch); returns whether it did. With PEFT the teacher is the base model itself:
        nothing to load."""
        path = os.path.join(directory, TEACHER_FILE)
        if self.config.teacher in SNAPSHOT_TEACHERS and is_peft_model(model):
            self.use_peft_base = True
            return True
        if self.config.teacher not in SNAPSHOT_TEACHERS or not os.path.isfile(path):
            return False
        from safetensors.torch import load_model

        from ..model.convert import remove_qat

        shell = copy.deepcopy(model)
        remove_qat(shell)
        self.module = self._freeze(shell)
        load_model(self.module, path, strict=True)
        return True


class DistillationLoss:
    """The Trainer's loss of a distilled run: ``(1 - w) * CE + w * T^2 * KL(teacher || student)`` in
    the QAT phase (``active``, set by the callback at the switch), the Trainer's own loss otherwise.

    It also keeps what ``qat/ce_loss`` and ``qat/distill_loss`` report: the CE and KL terms of every
    optimizer step since the last log, each the mean over that step's predicted tokens whatever the
    gradient accumulation, averaged over the steps and over the ranks (:meth:`pop_logs`).
    """

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher
        self.active = False
        self._sums: list = [0.0, 0.0, 0.0]  # CE and KL summed over micro-batches (each weighted), steps

    def __call__(self, trainer, compute_loss, student: nn.Module, model: nn.Module, inputs: dict[str, Any],
                 return_outputs: bool, num_items_in_batch):
        """``compute_loss`` is the Trainer's; ``student`` the unwrapped model (the PEFT teacher runs it)."""
        if not (model.training and self.active and self.teacher.ready):
            return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        labels = inputs["labels"]  # read first: with label smoothing the Trainer's compute_loss pops them
        ce, outputs = compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        cfg = self.teacher.config
        teacher_logits = self.teacher.logits(student, inputs)
        # normalised as the Trainer normalises its CE: over the accumulated batch's tokens when the model
        # takes num_items_in_batch, else per micro-batch (the Trainer then divides by the accumulation steps)
        token_normalised = num_items_in_batch is not None and trainer.model_accepts_loss_kwargs
        kl = distill_kl(outputs.logits, teacher_logits, labels, cfg.temperature, cfg.top_k,
                        num_items_in_batch if token_normalised else None)
        processes = trainer.accelerator.num_processes
        if token_normalised and trainer.args.average_tokens_across_devices:
            # num_items_in_batch counts every rank's tokens; the Trainer scales its CE up by the number of
            # processes (DDP then averages the gradients): the KL term gets the same factor
            kl = kl * processes
        loss = (1.0 - cfg.weight) * ce + cfg.weight * kl
        # The log: token-normalised terms of one step's micro-batches add up to that step's mean; per
        # micro-batch means are averaged over the accumulation steps instead.
        accumulation = trainer.args.gradient_accumulation_steps
        weight = 1.0 if token_normalised else 1.0 / accumulation
        ce_sum, kl_sum, steps = self._sums
        self._sums = [ce_sum + ce.detach() * weight, kl_sum + kl.detach() * weight, steps + 1.0 / accumulation]
        return (loss, outputs) if return_outputs else loss

    def pop_logs(self, trainer) -> dict[str, float]:
        """``qat/ce_loss`` and ``qat/distill_loss`` since the last call, reduced over the ranks (a
        collective when several processes train: call on every rank, as the Trainer's logging does)."""
        ce_sum, kl_sum, steps = self._sums
        self._sums = [0.0, 0.0, 0.0]
        device = trainer.args.device
        sums = torch.tensor([float(ce_sum), float(kl_sum), steps], dtype=torch.float64, device=device)
        if trainer.accelerator.num_processes > 1:
            sums = trainer.accelerator.reduce(sums, reduction="mean")
        # With tokens averaged across devices a rank's terms are (its share of the global token sum) x P,
        # so their mean over the ranks is the global token mean.
        ce, kl, steps = sums.tolist()
        return {} if steps == 0 else {"qat/ce_loss": ce / steps, "qat/distill_loss": kl / steps}


def check_vocabulary(teacher: nn.Module, student: nn.Module) -> None:
    """A teacher must score the student's vocabulary: same output size."""
    def vocab(m: nn.Module) -> int | None:
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        return None if head is None else int(head.weight.shape[0])

    if vocab(teacher) != vocab(student):
        raise QATModelError(f"the distillation teacher predicts {vocab(teacher)} tokens but the student {vocab(student)}: "
                            "use a teacher with the student's tokenizer and vocabulary")
