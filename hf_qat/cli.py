"""The ``hf-qat`` command line: plan | fit | best-bits | export | demo."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .bits import bits_label, normalize_bits
from .counts import human, parse_bytes, parse_count

console = Console()


def _bits(text: str):
    try:
        return normalize_bits(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _weight_format(text: str) -> str:
    from .planner.storage import weight_format

    try:
        weight_format(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _count(text: str) -> float:
    try:
        return parse_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _size(text: str) -> float:
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# ---------------------------------------------------------------------------------------- plan
def cmd_plan(args: argparse.Namespace) -> int:
    from .planner import QATScalingLaw, plan_qat

    law = QATScalingLaw.load(args.law) if args.law else None
    strategy = args.strategy or ("law" if law is not None else "paper")
    plan = plan_qat(
        num_params=args.params, total_tokens=args.tokens, bits=args.bits, total_steps=args.steps,
        tokens_per_step=args.tokens_per_step, law=law, strategy=strategy, pretrained_tokens=args.pretrained_tokens,
        active_params=args.active_params, moe_params=args.moe_params, method=args.method,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        _print_plan(plan)
    if args.plot:
        from .plots import plot_plan

        console.print(f"plot written to {plot_plan(plan, args.plot, law)}", markup=False)
    return 0


def _print_plan(plan) -> None:
    console.print(
        f"[bold]{bits_label(plan.bits)}-bit QAT plan[/bold] for {human(plan.num_params)} parameters"
        + (f" ({human(plan.active_params)} active; S counts the {plan.moe_params})" if plan.active_params else "")
        + ", "
        f"{human(plan.total_tokens)} tokens"
        + (f" after {human(plan.pretrained_tokens)} pretrained tokens" if plan.pretrained_tokens else "")
    )
    console.print(
        f"tokens per parameter byte S = {plan.tokens_per_param_byte:.4g} ({plan.storage_bits:g} bits per weight in "
        f"memory); D_total = {human(plan.d_total)}; "
        f"optimal QAT fraction {plan.qat_fraction:.3f} of D_total ({plan.strategy})"
    )
    table = Table(show_header=True, header_style="bold")
    with_law = plan.predicted_loss is not None  # predicted losses need a law (--law)
    for column in ("schedule", "QAT share", "switch step", "QAT tokens", "pred. loss")[:5 if with_law else 4]:
        table.add_column(column, justify="right" if column != "schedule" else "left", no_wrap=True)
    steps = "-" if plan.switch_step is None else f"{plan.switch_step} / {plan.total_steps}"
    loss = [f"{plan.predicted_loss:.4f}"] if with_law else []
    table.add_row(f"planner ({plan.strategy})", f"{plan.run_qat_fraction:.3f}", steps, human(plan.qat_tokens), *loss,
                  style="bold green")
    names = {"paretoq_10pct": "ParetoQ 10%", "switch_at_half": "half (torchtune)",
             "qat_from_start": "QAT from start", "ptq": "PTQ"}
    for name, row in plan.baselines.items():
        table.add_row(names.get(name, name), f"{row['run_qat_fraction']:.3f}",
                      "-" if "switch_step" not in row else f"{row['switch_step']} / {plan.total_steps}",
                      human(row["qat_tokens"]), *([f"{row['predicted_loss']:.4f}"] if with_law else []))
    console.print(table)
    if not with_law:
        console.print("predicted losses need a fitted law: --law law.json (hf-qat fit)")
    if plan.optimal_qat_tokens > plan.qat_tokens:
        console.print(f"the optimum wants {human(plan.optimal_qat_tokens)} QAT tokens")
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


# ---------------------------------------------------------------------------------------- fit
def cmd_fit(args: argparse.Namespace) -> int:
    from .planner import QATScalingLaw, load_runs

    runs = load_runs(args.runs)
    law = QATScalingLaw.fit(runs, starts=args.starts, bootstrap=args.bootstrap, seed=args.seed)
    path = law.save(args.output)
    diag = law.diagnostics
    table = Table("parameter", "value", show_header=True, header_style="bold")
    for name, value in law.params.items():
        table.add_row(name, f"{value:.6g}")
    console.print(table)
    console.print(
        f"{diag['runs']} runs fitted in {diag['fit_seconds']:.1f} s ({diag['starts']} starts); mean |relative error| "
        f"{diag['mean_abs_relative_error']:.3%}, max {diag['max_abs_relative_error']:.3%}"
    )
    console.print(f"law written to {path}", markup=False)
    if args.plot:
        from .plots import plot_fit

        console.print(f"plot written to {plot_fit(law, runs, args.plot)}", markup=False)
    return 0


# ---------------------------------------------------------------------------------------- best bits
def cmd_best_bits(args: argparse.Namespace) -> int:
    from .planner import QATScalingLaw
    from .planner.law import TIE_RELATIVE

    law = QATScalingLaw.load(args.law)
    choice = law.best_bits(args.memory, args.tokens, candidates=args.candidates)
    table = Table(show_header=True, header_style="bold")
    for column in ("format", "bits per weight", "parameters", "optimal QAT fraction", "predicted loss"):
        table.add_column(column, justify="right")
    for row in choice.candidates:
        style = "bold green" if row is choice.best or row in choice.ties else None
        table.add_row(row["format"], f"{row['storage_bits']:.3g}", human(row["num_params"]), f"{row['qat_fraction']:.3f}",
                      f"{row['predicted_loss']:.4f}", style=style)
    budget = f"{human(args.memory, 'B')} of weights and {human(args.tokens)} tokens"
    if choice.ties:
        console.print(f"no single best bit width for {budget}: [bold]{', '.join(r['format'] for r in choice.ties)}"
                      f"[/bold] tie at a predicted loss of {choice.best['predicted_loss']:.4f} (within "
                      f"{TIE_RELATIVE:.0e} relative)")
    else:
        console.print(f"best bit width for {budget}: [bold]{choice.best['format']}[/bold]")
    for warning in choice.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if any(row["storage_bits"] != row["bits"] for row in choice.candidates if row["format"] != bits_label(row["bits"])):
        console.print("formats of one bit width differ here only by the parameters their scales leave room for: the "
                      "law predicts at the bit width and knows no element grid")
    console.print(table)
    return 0


# ---------------------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    import os

    from .export import export_checkpoint
    from .errors import MissingTokenizerError

    tokenizer = None
    source = args.tokenizer or (args.checkpoint if os.path.isfile(os.path.join(args.checkpoint, "tokenizer_config.json")) else None)
    if source:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    options = {}
    for item in args.format_option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--format-option takes KEY=VALUE (e.g. ternary_type=TQ1_0), got {item!r}")
        options[key] = value
    try:
        info = export_checkpoint(args.checkpoint, args.out_dir, format=args.format, tokenizer=tokenizer,
                                 push_to_hub=args.push_to_hub, private=not args.public, base_model=args.base_model,
                                 format_options=options)
    except MissingTokenizerError:
        raise ValueError(f"GGUF embeds the tokenizer in the file, and {args.checkpoint} holds none (no "
                         "tokenizer_config.json): pass --tokenizer ID_OR_PATH (the base model's id, or a folder)") from None
    console.print(f"exported {info.format} to {info.path}: {info.weight_bytes / 1e6:.2f} MB of tensors "
                  f"(expected {info.expected_bytes / 1e6:.2f} MB); exact: {info.exact}", markup=False)
    for note in info.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    return 0


# ---------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import DemoSettings, run_demo

    overrides = {k: v for k, v in {"bits": args.bits, "steps": args.steps, "output_dir": args.output_dir,
                                   "export_format": args.format}.items() if v is not None}
    settings = DemoSettings.quick(**overrides) if args.quick else DemoSettings(**overrides)
    result = run_demo(settings)
    return 0 if result.losses["qat"] < result.losses["ptq"] else 1


# ---------------------------------------------------------------------------------------- sweep
def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    run_sweep(args.config, args.out, shard=args.shard, progress=not args.no_progress, save_models=args.save_models)
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from .sweep.report import sweep_report

    report = sweep_report(args.dir, law=args.law, fit=not args.no_fit)
    console.print(f"report written to {report.markdown_path} ({len(report.figures)} plots)", markup=False)
    return 0


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-qat", description="Compute-optimal quantization-aware training")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="when to switch to QAT (the paper's formula or a fitted law)")
    p.add_argument("--params", type=_count, required=True, help="model parameters, e.g. 135M (an MoE: all of them)")
    p.add_argument("--active-params", type=_count, default=None,
                   help="a mixture of experts: the parameters one token uses, e.g. 3B (stated in the plan)")
    p.add_argument("--moe-params", choices=["total", "active"], default="total",
                   help="which N the tokens per parameter byte use (default total: what memory holds)")
    p.add_argument("--tokens", type=_count, required=True, help="training tokens of this run, e.g. 10B")
    p.add_argument("--bits", type=_bits, required=True, help="1, 1.58/ternary, 2, 3, 4, 5, 6, 8")
    p.add_argument("--method", default=None, help="the quantizer family; a block-scaled one (MXFP4, NVFP4, ggml's blocks) "
                   "counts its block scales (MXFP4 4.25, NVFP4 4.5, Q4_K 4.5, Q6_K 6.5625 bits per weight)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the run")
    p.add_argument("--tokens-per-step", type=_count, default=None)
    p.add_argument("--pretrained-tokens", type=_count, default=None, help="FP tokens the checkpoint already saw")
    p.add_argument("--law", default=None, help="a fitted law JSON (hf-qat fit)")
    p.add_argument("--strategy", choices=["paper", "law"], default=None, help="default: law with --law, else paper")
    p.add_argument("--plot", default=None, help="write a PNG")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    f = sub.add_parser("fit", help="fit the loss law to runs (CSV or JSONL: num_params,fp_tokens,qat_tokens,bits,loss)")
    f.add_argument("runs")
    f.add_argument("-o", "--output", required=True, help="law JSON to write")
    f.add_argument("--starts", type=int, default=24)
    f.add_argument("--bootstrap", type=int, default=0, help="bootstrap refits for prediction intervals")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--plot", default=None, help="write a PNG of predicted against observed loss")
    f.set_defaults(func=cmd_fit)

    b = sub.add_parser("best-bits", help="the bit width with the lowest predicted loss under a memory budget")
    b.add_argument("--memory", type=_size, required=True, help="bytes for the quantized weights, e.g. 1GB")
    b.add_argument("--tokens", type=_count, required=True)
    b.add_argument("--law", required=True)
    b.add_argument("--candidates", type=lambda t: [_weight_format(x) for x in t.split(",")],
                   default=[1, 1.58, 2, 3, 4, 6, 8],
                   help="comma-separated bit widths or formats (a block-scaled family's name, or int4-g32: "
                        "scales counted)")
    b.set_defaults(func=cmd_best_bits)

    e = sub.add_parser("export", help="write a low-bit checkpoint from a QAT checkpoint directory")
    e.add_argument("checkpoint", help="a Trainer checkpoint or output dir of a QAT run (holds qat_config.json)")
    e.add_argument("out_dir")
    e.add_argument("--format", default="auto", help="auto, compressed-tensors, gguf, bitnet, hf-qat")
    e.add_argument("--format-option", action="append", metavar="KEY=VALUE",
                   help="a format's option, e.g. ternary_type=TQ1_0 for gguf (repeatable)")
    e.add_argument("--tokenizer", default=None, help="tokenizer id or path (default: the checkpoint's, if saved)")
    e.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    e.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")
    e.add_argument("--base-model", default=None, help="the model this was quantized from (model card)")
    e.set_defaults(func=cmd_export)

    w = sub.add_parser("sweep", help="the paper's experiment on your data: FP trunks, branched QAT tails -> runs.jsonl")
    w.add_argument("config", help="sweep YAML (keys: sizes, data, budgets, bits, fractions, schedules, ...)")
    w.add_argument("--out", required=True, help="output folder (runs.jsonl, trunk checkpoints); rerun to resume")
    w.add_argument("--shard", default=None, metavar="I/N", help="run only share I of N (default: torchrun rank)")
    w.add_argument("--save-models", action="store_true", help="also save every run's final model")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.set_defaults(func=cmd_sweep)

    r = sub.add_parser("sweep-report", help="plots and a markdown table of a sweep's runs.jsonl")
    r.add_argument("dir", help="the sweep's output folder")
    r.add_argument("--law", default=None, help="a fitted law JSON to draw (default: fit one to the rows)")
    r.add_argument("--no-fit", action="store_true", help="draw no law curve")
    r.set_defaults(func=cmd_sweep_report)

    d = sub.add_parser("demo", help="train a small model FP then QAT on offline text, compare with FP and PTQ, export")
    d.add_argument("--quick", action="store_true", help="a shortened run (CI)")
    d.add_argument("--bits", type=_bits, default=None, help="weight bits (default 2)")
    d.add_argument("--steps", type=int, default=None, help="optimizer steps of each run")
    d.add_argument("--format", default=None, help="export format (default: auto)")
    d.add_argument("--output-dir", default=None, help="where runs and the export go (default hf_qat_demo_out)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")  # a message's [brackets] are text, not markup
        return 2


if __name__ == "__main__":
    sys.exit(main())
