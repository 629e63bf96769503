"""The cost of one log line of QATCallback: hf_qat 0.1.0 recomputed the weight error at every log
(a full pass over the quantized weights, an all-gather of every weight under FSDP2); now on_log
reports the error measured at the switch and at evaluation.

    python benchmarks/log_overhead.py [--model demo|smollm2-135m] [--out benchmarks/results/log_overhead.json]

Prints and writes: the seconds of that pass (the 0.1.0 per-log cost) and of today's ``on_log``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerControl, TrainerState, TrainingArguments

import hf_qat
from step_overhead import MODELS


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo", choices=sorted(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/log_overhead.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODELS[args.model]["config"]))
    callback = hf_qat.QATCallback(bits=4, group_size=32, start=0)
    hf_qat.prepare_model_for_qat(model, callback.config)
    hf_qat.activate_qat(model)
    callback.weight_error = hf_qat.quantization_error(model)
    state, control = TrainerState(), TrainerControl()
    targs = TrainingArguments("/tmp/hf_qat_log_overhead", report_to=[], use_cpu=not torch.cuda.is_available())
    per_log_0_1_0 = median_seconds(lambda: hf_qat.quantization_error(model), args.repeats)
    per_log_now = median_seconds(lambda: callback.on_log(targs, state, control, logs={"loss": 1.0}, model=model),
                                 args.repeats)
    result = {"model": args.model, "parameters": sum(p.numel() for p in model.parameters()),
              "seconds_per_log_0_1_0": per_log_0_1_0, "seconds_per_log_now": per_log_now,
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
