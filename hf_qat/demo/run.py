"""``hf-qat demo``: the whole method on a laptop-sized model, with no download.

1. Text: the Python standard library's source; a byte-level BPE tokenizer trained on it.
2. FP baseline: a small Llama trained from scratch in full precision (warmup, stable, 20 % cooldown).
3. PTQ baseline: that FP model rounded to the target grid (no training).
4. QAT: the same model and budget trained with ``QATCallback(start="auto")``: the planner picks the
   switch step from tokens per parameter byte, the LR cooldown is fused into the QAT phase.
5. Export: the QAT model written in an exact low-bit format, reloaded from disk, evaluated.

All losses are mean next-token cross-entropy (nats) on held-out standard-library files.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from ..callback import QATCallback
from ..config import QATConfig, bits_label
from ..convert import ptq
from ..export import export_checkpoint, load_exported
from .corpus import BlockDataset, load_stdlib_corpus, make_blocks, train_tokenizer

console = Console()


@dataclass
class DemoSettings:
    """The demo's knobs. The defaults take about 5 minutes on 2 CPU cores; ``quick()`` about 1."""

    bits: float | int | str = 2
    group_size: int | str = 32
    steps: int = 1500
    batch_size: int = 16
    block_size: int = 128
    vocab_size: int = 512
    hidden_size: int = 64
    layers: int = 4
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    eval_blocks: int = 256
    start: Any = "auto"
    export_format: str = "auto"
    output_dir: str = "hf_qat_demo_out"
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoSettings":
        """A shortened run for CI: same pipeline, fewer steps."""
        return cls(**{"steps": 300, "warmup_steps": 30, "eval_blocks": 96, **overrides})


@dataclass
class DemoResult:
    settings: dict[str, Any]
    num_params: int
    train_tokens: int
    switch_step: int
    qat_fraction: float
    tokens_per_param_byte: float
    losses: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(settings: DemoSettings):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.seed)
    config = LlamaConfig(
        vocab_size=settings.vocab_size, hidden_size=settings.hidden_size, intermediate_size=3 * settings.hidden_size,
        num_hidden_layers=settings.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=settings.block_size, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss (nats) over ``blocks``."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        tokens = batch.numel() - batch.shape[0]
        total += float(loss) * tokens
        count += tokens
    model.train()
    return total / count


def _trainer(settings: DemoSettings, model, dataset, output_dir: str, callbacks=(), **extra):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, warmup_steps=settings.warmup_steps, weight_decay=0.1,
        logging_steps=max(1, settings.steps // 10), save_strategy="no", report_to=[], seed=settings.seed,
        use_cpu=_device() == "cpu", dataloader_num_workers=0, disable_tqdm=False, **extra,
    )
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=list(callbacks))


def run_demo(settings: DemoSettings | None = None) -> DemoResult:
    """Run the whole demo and print its table; returns the figures (also written to results.json)."""
    settings = settings or DemoSettings()
    logging.getLogger("hf_qat").setLevel(logging.INFO)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    os.makedirs(settings.output_dir, exist_ok=True)

    console.rule("[bold]hf_qat demo[/bold]")
    t0 = time.perf_counter()
    needed_blocks = settings.steps * settings.batch_size
    # About 2.2 bytes of Python source per BPE token at this vocabulary size.
    corpus = load_stdlib_corpus(max_train_bytes=int(needed_blocks * settings.block_size * 2.4) + 100_000,
                                max_eval_bytes=settings.eval_blocks * settings.block_size * 4)
    tokenizer = train_tokenizer(corpus.train_text, settings.vocab_size)
    train_blocks = make_blocks(corpus.train_text, tokenizer, settings.block_size, desc="tokenizing train")
    eval_blocks = make_blocks(corpus.eval_text, tokenizer, settings.block_size, max_blocks=settings.eval_blocks,
                              desc="tokenizing eval")
    dataset = BlockDataset(train_blocks)
    seconds["data"] = time.perf_counter() - t0
    epochs = needed_blocks / len(dataset)
    console.print(
        f"data: {corpus.train_bytes / 1e6:.1f} MB of standard-library source -> {train_blocks.numel() / 1e6:.2f}M "
        f"training tokens ({epochs:.2f} epochs), {eval_blocks.numel() / 1e3:.0f}K held-out tokens; "
        f"tokenizer of {settings.vocab_size} tokens"
    )

    cfg = QATConfig(bits=settings.bits, group_size=settings.group_size, start=settings.start, fuse_cooldown=True)

    # FP baseline: warmup, stable, 20 % cooldown.
    console.rule("FP baseline")
    t0 = time.perf_counter()
    fp_model = build_model(settings)
    num_params = sum(p.numel() for p in fp_model.parameters())
    decay_steps = max(1, int(0.2 * settings.steps))
    _trainer(settings, fp_model, dataset, os.path.join(settings.output_dir, "fp"), lr_scheduler_type="warmup_stable_decay",
             lr_scheduler_kwargs={"num_decay_steps": decay_steps}).train()
    losses = {"fp": evaluate(fp_model, eval_blocks)}
    seconds["fp"] = time.perf_counter() - t0

    console.rule(f"PTQ baseline ({bits_label(cfg.bits)}-bit round-to-nearest of the FP model)")
    t0 = time.perf_counter()
    losses["ptq"] = evaluate(ptq(copy.deepcopy(fp_model), cfg), eval_blocks)
    seconds["ptq"] = time.perf_counter() - t0
    del fp_model

    console.rule(f"FP -> {bits_label(cfg.bits)}-bit QAT, start={settings.start!r}, fused cooldown")
    t0 = time.perf_counter()
    qat_model = build_model(settings)
    callback = QATCallback(cfg)
    _trainer(settings, qat_model, dataset, os.path.join(settings.output_dir, "qat"), callbacks=[callback]).train()
    losses["qat"] = evaluate(qat_model, eval_blocks)
    seconds["qat"] = time.perf_counter() - t0
    plan = callback.plan

    result = DemoResult(
        settings=asdict(settings), num_params=num_params, train_tokens=settings.steps * settings.batch_size * settings.block_size,
        switch_step=callback.switch_step, qat_fraction=(settings.steps - callback.switch_step) / settings.steps,
        tokens_per_param_byte=plan.tokens_per_param_byte if plan else math.nan,
        losses=losses, seconds=seconds, warnings=list(plan.warnings) if plan else [],
    )
    _export_step(settings, qat_model, tokenizer, eval_blocks, result)
    result.seconds["total"] = time.perf_counter() - started
    with open(os.path.join(settings.output_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(asdict(result), fh, indent=2)
    print_table(result)
    return result


def _export_step(settings: DemoSettings, model, tokenizer, eval_blocks, result: DemoResult) -> None:
    """Export the QAT model, reload it from disk (checksums verified) with transformers, evaluate it."""
    t0 = time.perf_counter()
    out = os.path.join(settings.output_dir, "export")
    card = {"eval": {"held-out loss (QAT)": result.losses["qat"], "held-out loss (PTQ)": result.losses["ptq"],
                     "held-out loss (FP)": result.losses["fp"]},
            "training_tokens": result.train_tokens,
            "description": "A small Llama trained from scratch by `hf-qat demo` on the Python standard library."}
    info = export_checkpoint(model, out, format=settings.export_format, tokenizer=tokenizer, card=card)
    reloaded = load_exported(out)
    result.losses["exported"] = evaluate(reloaded, eval_blocks)
    result.export = {"format": info.format, "path": out, "bytes": info.weight_bytes, "expected_bytes": info.expected_bytes,
                     "exact": info.exact}
    result.seconds["export"] = time.perf_counter() - t0


def print_table(result: DemoResult) -> None:
    settings = result.settings
    bits = bits_label(settings["bits"])
    console.rule("[bold]results[/bold]")
    console.print(
        f"{result.num_params / 1e6:.2f}M-parameter Llama, {result.train_tokens / 1e6:.2f}M training tokens, "
        f"{bits}-bit weights (group {settings['group_size']})"
    )
    console.print(
        f"planned switch step: [bold]{result.switch_step}[/bold] of {settings['steps']} "
        f"(QAT on {result.qat_fraction:.1%} of the run; tokens per parameter byte S={result.tokens_per_param_byte:.3g})"
    )
    for warning in result.warnings:
        console.print(f"[yellow]planner warning:[/yellow] {warning}")
    table = Table(show_header=True, header_style="bold")
    for column in ("model", "held-out loss", "perplexity", "time (s)"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=column == "model")
    rows = [("FP (full precision)", "fp", "fp"), (f"PTQ {bits}-bit", "ptq", "ptq"),
            (f"QAT {bits}-bit (planned, fused cooldown)", "qat", "qat")]
    if "exported" in result.losses:
        rows.append((f"exported ({result.export['format']}), reloaded", "exported", "export"))
    for label, key, time_key in rows:
        loss = result.losses[key]
        table.add_row(label, f"{loss:.4f}", f"{math.exp(loss):.2f}", f"{result.seconds.get(time_key, 0):.1f}")
    console.print(table)
    verdict = "below" if result.losses["qat"] < result.losses["ptq"] else "NOT below"
    if result.export:
        console.print(f"export: {result.export['format']} in {result.export['path']}, "
                      f"{result.export['bytes'] / 1e3:.1f} KB of tensors")
    console.print(f"QAT loss is {verdict} PTQ loss at {bits} bits; wall time {result.seconds.get('total', 0):.0f} s")
