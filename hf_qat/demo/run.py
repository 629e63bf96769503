"""``hf-qat demo``: the planned switch against the folklore, on a laptop-sized model, with no download.

1. Text: the Python standard library's source; a byte-level BPE tokenizer trained on it.
2. One FP trunk (warmup, then the stable LR), as ``hf-qat sweep`` trains it.
3. Branched from the trunk, at equal total tokens: the FP baseline (its own 20 % cooldown), the QAT
   fraction the planner picks from tokens per parameter byte (arXiv 2509.22935), ParetoQ's 10 % and
   the switch at half, each with the LR cooldown fused into its QAT phase; PTQ of the FP model.
4. Export: the planned QAT model written in an exact low-bit format, reloaded from disk, evaluated.

All losses are mean next-token cross-entropy (nats) on held-out standard-library files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..bits import bits_label
from ..export import check_loadable, export_checkpoint, load_exported
from ..planner import plan_qat
from ..sweep import SweepConfig, run_sweep
from ..sweep.data import load_sweep_data
from ..sweep.engine import build_model, evaluate, load_checkpoint, num_params
from ..sweep.results import RUNS_NAME, read_rows

console = Console()
SIZE = "demo"
BASELINES = {"paretoq_10pct": 0.1, "switch_at_half": 0.5}


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

    def sweep_config(self, fractions: list[float]) -> SweepConfig:
        size = {"hidden_size": self.hidden_size, "num_hidden_layers": self.layers,
                "intermediate_size": 3 * self.hidden_size, "num_attention_heads": 4, "num_key_value_heads": 2}
        return SweepConfig(
            sizes={SIZE: size}, data="demo", vocab_size=self.vocab_size, sequence_length=self.block_size,
            batch_size=self.batch_size, learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
            budgets=[float(self.steps * self.batch_size * self.block_size)], bits=[self.bits], fractions=fractions,
            schedules=["fused"], group_size=self.group_size, eval_tokens=self.eval_blocks * self.block_size,
            seed=self.seed,
        )


@dataclass
class DemoResult:
    settings: dict[str, Any]
    num_params: int
    train_tokens: int
    switch_step: int
    qat_fraction: float
    tokens_per_param_byte: float
    losses: dict[str, float] = field(default_factory=dict)
    fractions: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    plan: dict[str, Any] | None = None

    @property
    def winner(self) -> str:
        """The QAT row with the lowest loss among the planned fraction and the baselines."""
        return min(("qat", *BASELINES), key=lambda k: self.losses[k])


def _planned_fraction(settings: DemoSettings, n: int) -> tuple[float, Any]:
    tokens = settings.steps * settings.batch_size * settings.block_size
    if settings.start == "auto":
        plan = plan_qat(n, tokens, settings.bits, total_steps=settings.steps)
        return plan.run_qat_fraction, plan
    return float(settings.start), None


def run_demo(settings: DemoSettings | None = None) -> DemoResult:
    """Run the whole demo and print its table; returns the figures (also written to results.json)."""
    settings = settings or DemoSettings()
    _check_export_loads(settings, settings.sweep_config([0.0]))
    logging.getLogger("hf_qat").setLevel(logging.INFO)
    started = time.perf_counter()
    os.makedirs(settings.output_dir, exist_ok=True)
    console.rule("[bold]hf_qat demo[/bold]")

    probe = settings.sweep_config([0.0])
    n, _ = num_params(probe, SIZE)
    planned, plan = _planned_fraction(settings, n)
    fractions = sorted({0.0, planned, *BASELINES.values()})
    config = settings.sweep_config(fractions)
    out = os.path.join(settings.output_dir, "sweep")
    summary = run_sweep(config, out, save_models=True, log=lambda message: console.print(message, markup=False))
    seconds = {"train": time.perf_counter() - started}

    rows = {(r["schedule"], float(r["fraction"])): r for r in read_rows(os.path.join(out, RUNS_NAME))}
    losses = {"fp": rows[("fp", 0.0)]["loss"], "ptq": rows[("ptq", 0.0)]["loss"], "qat": rows[("fused", planned)]["loss"]}
    losses.update({name: rows[("fused", f)]["loss"] for name, f in BASELINES.items()})
    planned_row = rows[("fused", planned)]
    result = DemoResult(
        settings=asdict(settings), num_params=n, train_tokens=planned_row["tokens"],
        switch_step=planned_row["switch_step"], qat_fraction=planned,
        tokens_per_param_byte=planned_row["tokens_per_param_byte"], losses=losses,
        fractions={"qat": planned, **BASELINES}, seconds=seconds, tokens=summary.tokens,
        warnings=list(plan.warnings) if plan else [], plan=plan.to_dict() if plan else None,
    )
    _export_step(settings, config, out, planned_row, result)
    result.seconds["total"] = time.perf_counter() - started
    with open(os.path.join(settings.output_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(asdict(result), fh, indent=2)
    print_table(result)
    return result


def _qat_model(config: SweepConfig, bits, seed: int):
    """The demo's model, prepared for QAT at ``bits``."""
    from ..model.convert import prepare_model_for_qat

    model = build_model(config, SIZE, seed)
    prepare_model_for_qat(model, config.qat_config(bits))
    return model


def _check_export_loads(settings: DemoSettings, config: SweepConfig) -> None:
    """Before any training: the export the demo ends with must load here (compressed-tensors needs its package)."""
    check_loadable(_qat_model(config, settings.bits, settings.seed), settings.export_format)


def _export_step(settings: DemoSettings, config: SweepConfig, sweep_dir: str, row: dict, result: DemoResult) -> None:
    """Export the planned QAT model, reload it from disk (checksums verified) with transformers, evaluate it."""
    t0 = time.perf_counter()
    data = load_sweep_data(config, row["total_steps"] * config.batch_size, cache_dir=os.path.join(sweep_dir, "cache"))
    model = _qat_model(config, row["bits"], settings.seed)
    load_checkpoint(os.path.join(sweep_dir, "models", row["key"].replace("/", "_") + ".pt"), model, None)
    out = os.path.join(settings.output_dir, "export")
    card = {"eval": {"held-out loss (QAT)": result.losses["qat"], "held-out loss (PTQ)": result.losses["ptq"],
                     "held-out loss (FP)": result.losses["fp"]},
            "training_tokens": result.train_tokens,
            "description": "A small Llama trained from scratch by `hf-qat demo` on the Python standard library."}
    info = export_checkpoint(model, out, format=settings.export_format, tokenizer=data.tokenizer, card=card,
                             plan=result.plan)
    result.losses["exported"] = evaluate(load_exported(out), data.eval)
    result.export = {"format": info.format, "path": out, "bytes": info.weight_bytes, "expected_bytes": info.expected_bytes,
                     "exact": info.exact}
    result.seconds["export"] = time.perf_counter() - t0


def print_table(result: DemoResult) -> None:
    settings = result.settings
    bits = bits_label(settings["bits"])
    console.rule("[bold]results[/bold]")
    console.print(
        f"{result.num_params / 1e6:.2f}M-parameter Llama, {result.train_tokens / 1e6:.2f}M training tokens per run, "
        f"{bits}-bit weights (group {settings['group_size']}); tokens per parameter byte S={result.tokens_per_param_byte:.3g}"
    )
    tokens = result.tokens
    console.print(f"one FP trunk, every run branched from it: {tokens['branched_tokens'] / 1e6:.2f}M tokens trained "
                  f"instead of {tokens['unbranched_tokens'] / 1e6:.2f}M")
    for warning in result.warnings:
        console.print(f"[yellow]planner warning:[/yellow] {escape(warning)}")
    table = Table(show_header=True, header_style="bold")
    for column in ("model", "QAT", "loss", "ppl"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=column == "model")
    winner = result.winner
    rows = [("FP (20 % cooldown)", "fp", "-"), (f"PTQ {bits}-bit", "ptq", "0")]
    rows += [(f"QAT {bits}-bit planned", "qat", f"{result.fractions['qat']:.1%}"),
             (f"QAT {bits}-bit ParetoQ 10 %", "paretoq_10pct", "10%"),
             (f"QAT {bits}-bit at half", "switch_at_half", "50%")]
    if "exported" in result.losses:
        rows.append(("planned, exported+reloaded", "exported", "-"))
    for label, key, share in rows:
        loss = result.losses[key]
        table.add_row(label, share, f"{loss:.4f}", f"{math.exp(loss):.2f}", style="bold green" if key == winner else None)
    console.print(table)
    names = {"qat": "the planned fraction", "paretoq_10pct": "ParetoQ's 10 %", "switch_at_half": "the switch at half"}
    console.print(f"lowest QAT loss at equal tokens: [bold]{names[winner]}[/bold]; QAT is "
                  f"{'below' if result.losses['qat'] < result.losses['ptq'] else 'NOT below'} PTQ at {bits} bits; "
                  f"wall time {result.seconds.get('total', 0):.0f} s")
