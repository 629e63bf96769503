"""``hf-qat sweep-report DIR``: plots and a markdown table of a sweep's runs.jsonl.

Writes into ``DIR/report/``:

* ``loss_vs_fraction_<bits>.png`` (``<bits>-<method>`` for a method other than the bit width's auto
  one, e.g. ``4-<method>``): per (size, budget), the measured loss at each QAT fraction
  (0 = PTQ), the fitted law's curve, the paper's f_hat and the observed optimum (or its bound);
* ``optimum_vs_S.png``: the observed optimal fraction against tokens per parameter byte, with the
  paper's curve; a bound (the grid does not bracket the optimum) is an open triangle at the bound,
  pointing the way the optimum lies;
* ``fused_minus_classic.png`` (when classic runs exist): loss(fused) - loss(classic) per bit width;
* ``report.md``: the tables (f* a measured value, or a bound "<= x" / ">= x"), the paper comparison over
  the measured optima (MAE, Spearman, 95% bootstrap intervals over cells), the bounds apart, fused -
  classic, seed noise;
* ``law.json`` (unless ``fit=False`` or a law is given): the loss law fitted to the fp, ptq and fused
  rows, with its leave-one-budget-out prediction error in its diagnostics.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bits import bits_label
from ..planner import QATScalingLaw, load_runs
from ..plots import _finish, _pyplot
from .analysis import (Cell, cells, fused_classic_pairs, fused_minus_classic, moe_comparison, optimum_seed_spread,
                       paper_comparison, seed_noise)
from .results import RUNS_NAME, read_rows

LAW_SCHEDULES = ("fp", "ptq", "fused")


@dataclass
class SweepReport:
    markdown_path: str
    figures: list[str] = field(default_factory=list)
    law_path: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def law_rows(rows: list[dict]) -> list[dict]:
    """The rows the loss law describes: FP, PTQ and fused-schedule QAT (the law has no schedule term)."""
    return [r for r in rows if r["schedule"] in LAW_SCHEDULES]


def fit_law(rows: list[dict], starts: int = 24) -> QATScalingLaw:
    """The law fitted to ``law_rows(rows)``, with ``leave_one_budget_out`` in its diagnostics: for
    each budget, the mean |relative error| of a fit without that budget's rows on those rows."""
    data = law_rows(rows)
    law = QATScalingLaw.fit(data, starts=starts)
    held_out = {}
    for budget in sorted({float(r["budget"]) for r in data}):
        train = [r for r in data if float(r["budget"]) != budget]
        test = [r for r in data if float(r["budget"]) == budget]
        if len({float(r["budget"]) for r in train}) < 2:
            continue
        partial = QATScalingLaw.fit(train, starts=starts)
        runs = load_runs(test)
        held_out[f"{budget:g}"] = float(np.mean(np.abs(partial.predict_runs(runs) / runs.loss - 1.0)))
    law.diagnostics["leave_one_budget_out"] = held_out
    law.diagnostics["fitted_on"] = f"{len(data)} rows (schedules {', '.join(LAW_SCHEDULES)})"
    return law


def sweep_report(out_dir: str | os.PathLike, law: str | os.PathLike | QATScalingLaw | None = None,
                 fit: bool = True) -> SweepReport:
    out_dir = os.fspath(out_dir)
    rows = read_rows(os.path.join(out_dir, RUNS_NAME))
    if not rows:
        raise ValueError(f"{out_dir} holds no {RUNS_NAME} rows: run hf-qat sweep first")
    folder = os.path.join(out_dir, "report")
    os.makedirs(folder, exist_ok=True)
    report = SweepReport(markdown_path=os.path.join(folder, "report.md"))
    if isinstance(law, (str, os.PathLike)):
        law = QATScalingLaw.load(law)
    elif law is None and fit and len(law_rows(rows)) >= 20:
        law = fit_law(rows)
        report.law_path = law.save(os.path.join(folder, "law.json"))
    fused = cells(rows, "fused")
    for bits, method in sorted({(c.bits, c.method) for c in fused}):
        selected = [c for c in fused if c.bits == bits and c.method == method]
        path = os.path.join(folder, f"loss_vs_fraction_{selected[0].label}.png")
        report.figures.append(_plot_cells(selected, law, path))
    if fused:
        report.figures.append(_plot_optimum(fused, os.path.join(folder, "optimum_vs_S.png")))
    diffs = fused_minus_classic(rows)
    if diffs:
        report.figures.append(_plot_fused_minus_classic(rows, os.path.join(folder, "fused_minus_classic.png")))
    report.summary = {"rows": len(rows), "paper": paper_comparison(fused), "moe": moe_comparison(fused),
                      "fused_minus_classic": diffs,
                      "tokens": _token_accounting(out_dir),
                      "seed_noise": seed_noise(rows), "optimum_seed_spread": optimum_seed_spread(fused),
                      "law": None if law is None else {k: v for k, v in law.diagnostics.items() if k != "residuals"}}
    with open(report.markdown_path, "w", encoding="utf-8") as fh:
        fh.write(markdown(rows, fused, report.summary))
    return report


def _token_accounting(out_dir: str) -> dict[str, int] | None:
    """Tokens the sweep's grid trains branched vs unbranched (from its saved config), or None."""
    import json

    from .config import SweepConfig
    from .grid import plan_runs, token_accounting
    from .runner import CONFIG_NAME

    path = os.path.join(out_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        config = SweepConfig.from_dict(json.load(fh))
    return token_accounting(plan_runs(config), config.tokens_per_step)


# ---------------------------------------------------------------------------------------- markdown
def _value(x: float, digits: int = 3, sign: str = "") -> str:
    return "-" if math.isnan(x) else f"{x:{sign}.{digits}f}"


def _interval(pair, digits: int = 3) -> str:
    low, high = pair
    return "-" if math.isnan(low) else f"[{low:.{digits}f}, {high:.{digits}f}]"


def markdown(rows: list[dict], fused: list[Cell], summary: dict[str, Any]) -> str:
    fractions = sorted({f for c in fused for f in c.losses})
    lines = ["# Sweep report", "", f"{summary['rows']} rows. Loss: held-out mean cross-entropy (nats). Fraction 0 is "
             "PTQ of the FP model; f* the observed optimum: where the best QAT fraction has a measured QAT fraction "
             "on each side, the argmin refined by a parabola in log f through it and its neighbours; else a bound "
             "(best at the smallest QAT fraction, PTQ worse: <= the next fraction; PTQ best: <= the smallest; best at "
             "the largest: >= the one below it). f_hat the paper's exp(-6.7297 / ln S).", ""]
    tokens = summary.get("tokens")
    if tokens:
        lines += [f"Tokens trained: {tokens['branched_tokens'] / 1e6:.1f}M with one FP trunk per size and branched "
                  f"tails, against {tokens['unbranched_tokens'] / 1e6:.1f}M for the same runs from scratch "
                  f"({1 - tokens['branched_tokens'] / tokens['unbranched_tokens']:.0%} saved).", ""]
    moe = any(c.active_params for c in fused)
    lines += ["| size | seed | budget | bits | S | FP | " + " | ".join(f"f={f:g}" for f in fractions) + " | f* | f_hat |"
              + (" f_hat (N active) |" if moe else ""), "|" + "---|" * (8 + moe + len(fractions))]
    for c in fused:
        cols = [f"{c.losses[f]:.4f}" if f in c.losses else "-" for f in fractions]
        best = min(c.losses, key=c.losses.get)
        cols = [f"**{v}**" if f == best else v for f, v in zip(fractions, cols)]
        fp = "-" if c.fp_loss is None else f"{c.fp_loss:.4f}"
        lines.append(f"| {c.size} | {c.seed} | {c.budget:.3g} | {c.label} | {c.tokens_per_param_byte:.3g} | "
                     f"{fp} | " + " | ".join(cols) + f" | {c.observed_optimum} | {c.paper_fraction:.3f} |"
                     + (f" {c.paper_fraction_with('active'):.3f} |" if moe else ""))
    lines += ["", "## Against the paper's formula", "", "Over the cells with a measured optimum; 95% bootstrap "
              "intervals over those cells in brackets. Signed error: mean of f* - f_hat (> 0: the formula "
              "under-plans). Bounds: cells whose optimum the grid does not bracket, and how many of them f_hat "
              "satisfies.", "",
              "| bits | measured | S range | MAE of f_hat | signed error | Spearman(f*, S) | bounds (f_hat within) |",
              "|---|---|---|---|---|---|---|"]
    for key, s in summary["paper"].items():
        lines.append(f"| {key} | {s['measured']} of {s['cells']} | {s['S_min']:.3g} - {s['S_max']:.3g} | "
                     f"{_value(s['mae'])} {_interval(s['mae_interval'])} | {_value(s['mean_signed_error'], sign='+')} "
                     f"{_interval(s['mean_signed_error_interval'])} | {_value(s['spearman_optimum_vs_S'], 2)} "
                     f"{_interval(s['spearman_interval'], 2)} | {s['bounds']} ({s['bounds_satisfied_by_f_hat']}) |")
    bounds = [c for c in fused if not c.observed_optimum.measured]
    if bounds:
        lines += ["", "## Bounds (the grid does not bracket the optimum)", "",
                  "| size | seed | budget | bits | S | f* | f_hat | f_hat within |", "|---|---|---|---|---|---|---|---|"]
        for c in bounds:
            within = "yes" if c.observed_optimum.satisfied_by(c.paper_fraction) else "no"
            lines.append(f"| {c.size} | {c.seed} | {c.budget:.3g} | {c.label} | {c.tokens_per_param_byte:.3g} | "
                         f"{c.observed_optimum} | {c.paper_fraction:.3f} | {within} |")
    moe = summary.get("moe")
    if moe:
        m = moe["moe"]
        lines += ["", "## Mixtures of experts: which N puts the optimum on the paper's curve", "",
                  "Over the MoE cells with a measured optimum (95% bootstrap intervals over those cells; the "
                  "difference is total - active on the same resamples: > 0 favours N = active).", "",
                  "| measured | MAE, N = total | MAE, N = active | total - active | bounds (within: total, active) "
                  "| dense cells' MAE |", "|---|---|---|---|---|---|",
                  f"| {m['measured']} of {m['cells']} | {m['mae_total']:.3f} {_interval(m['mae_total_interval'])} | "
                  f"{m['mae_active']:.3f} {_interval(m['mae_active_interval'])} | {m['total_minus_active']:+.3f} "
                  f"{_interval(m['total_minus_active_interval'])} | {m['bounds']} ({m['bounds_satisfied_total']}, "
                  f"{m['bounds_satisfied_active']}) | {moe['dense']['mae']:.3f} ({moe['dense']['cells']} cells) |"]
    if summary["fused_minus_classic"]:
        lines += ["", "## Fused minus classic (negative: fusing the cooldown into QAT is better)", "",
                  "| bits | pairs | mean | min | max |", "|---|---|---|---|---|"]
        for bits, d in summary["fused_minus_classic"].items():
            lines.append(f"| {bits} | {d['pairs']} | {d['mean']:+.4f} | {d['min']:+.4f} | {d['max']:+.4f} |")
    if summary["seed_noise"]:
        lines += ["", "## Seed noise (same run, other seed)", "", "| run | seeds | loss spread |", "|---|---|---|"]
        for n in summary["seed_noise"]:
            lines.append(f"| {n['key']} | {n['seeds']} | {n['spread']:.4f} |")
    if summary.get("optimum_seed_spread"):
        lines += ["", "## The optimum under other seeds", "", "| cell | seeds | f* per seed | spread |", "|---|---|---|---|"]
        for n in summary["optimum_seed_spread"]:
            spread = "-" if n["spread"] is None else f"{n['spread']:.3f}"
            lines.append(f"| {n['key']} | {n['seeds']} | {', '.join(n['optima'])} | {spread} |")
    law = summary.get("law")
    if law:
        lines += ["", "## Fitted law", "", f"Fitted on {law.get('fitted_on', '?')}: mean |relative error| "
                  f"{law['mean_abs_relative_error']:.3%}, max {law['max_abs_relative_error']:.3%}."]
        for budget, err in law.get("leave_one_budget_out", {}).items():
            lines.append(f"- budget {budget} held out: mean |relative error| {err:.3%}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- plots
def _plot_cells(cs: list[Cell], law: QATScalingLaw | None, path: str) -> str:
    plt = _pyplot()
    sizes = sorted({(c.num_params, c.size) for c in cs})
    budgets = sorted({c.budget for c in cs})
    fig, axes = plt.subplots(len(sizes), len(budgets), figsize=(3.4 * len(budgets), 2.8 * len(sizes)), dpi=110,
                             squeeze=False)
    for (n, size), row in zip(sizes, axes):
        for budget, ax in zip(budgets, row):
            for i, c in enumerate(x for x in cs if x.size == size and x.budget == budget):
                f = sorted(c.losses)
                ax.plot(f, [c.losses[v] for v in f], "o-", color=f"C{i}", ms=4, label=f"measured (seed {c.seed})")
                if i == 0:
                    if law is not None:
                        grid = np.linspace(0.0, 1.0, 101)
                        ax.plot(grid, law.loss_curve(c.num_params, c.tokens, c.bits, grid), color="0.4", lw=1,
                                label="fitted law")
                    ax.axvline(c.paper_fraction, color="C3", ls="--", lw=1, label=f"paper f_hat {c.paper_fraction:.2f}")
                    optimum = c.observed_optimum
                    ax.axvline(optimum.value, color="C2", ls=":" if optimum.measured else "-.", lw=1.2,
                               label=f"observed f* {optimum}" if optimum.bound else f"observed f* {optimum.value:.2f}")
                    ax.set_title(f"{size} ({n / 1e3:.0f}K), {budget / 1e6:.3g}M tok, S={c.tokens_per_param_byte:.3g}",
                                 fontsize=8)
                    values = list(c.losses.values())
                    low, high = min(values), float(np.percentile(values, 80))
                    ax.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.3 * (high - low + 1e-3))
            ax.set_xlabel("QAT fraction (0 = PTQ)", fontsize=8)
            ax.tick_params(labelsize=7)
            if ax.get_legend_handles_labels()[0]:  # a (size, budget) without a cell of these bits: no legend
                ax.legend(fontsize=6)
            ax.grid(alpha=0.3)
    method = "" if cs[0].method == "auto" else f" {cs[0].method}"
    fig.suptitle(f"{bits_label(cs[0].bits)}-bit{method}: held-out loss against the QAT fraction (fused schedule)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_optimum(cs: list[Cell], path: str) -> str:
    from ..planner import FITTED_RANGE, PAPER_A, optimal_qat_fraction, tokens_per_parameter_byte

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    s_values = [c.tokens_per_param_byte for c in cs]
    grid = np.logspace(math.log10(max(1.5, min(s_values) / 2)), math.log10(max(s_values) * 2), 200)
    ax.semilogx(grid, [optimal_qat_fraction(v, PAPER_A) for v in grid], color="k", lw=1, label="paper f_hat")
    ax.axvspan(*FITTED_RANGE, color="0.5", alpha=0.08, label="paper's fitted range")
    for i, (bits, method) in enumerate(sorted({(c.bits, c.method) for c in cs})):
        sel = [c for c in cs if c.bits == bits and c.method == method and not c.active_params]
        label = f"observed, {bits_label(bits)}" + ("" if bits_label(bits) == "ternary" else "-bit")
        label += "" if method == "auto" else f" {method}"
        _scatter_optima(ax, sel, [c.tokens_per_param_byte for c in sel], dict(color=f"C{i}"), label)
        moe = [c for c in cs if c.bits == bits and c.method == method and c.active_params]
        if moe:  # a mixture of experts at both of its S: from every parameter, and from the active ones
            _scatter_optima(ax, moe, [c.tokens_per_param_byte for c in moe],
                            dict(color=f"C{i}", marker="s", facecolors="none"), f"{label} MoE, S from total N")
            active = [tokens_per_parameter_byte(c.active_params, c.tokens, c.bits) for c in moe]
            _scatter_optima(ax, moe, active, dict(color=f"C{i}", marker="x"), f"{label} MoE, S from active N")
            grid = np.logspace(math.log10(grid[0]), math.log10(max(grid[-1], max(active) * 2)), 200)
    ax.set_xlim(grid[0], grid[-1])
    ax.set_xlabel("tokens per parameter byte S")
    ax.set_ylabel("optimal QAT fraction")
    ax.set_title("observed optimal QAT fraction against S")
    return _finish(plt, fig, ax, path)


def _scatter_optima(ax, cs: list[Cell], s_values: list[float], style: dict, label: str) -> None:
    """The measured optima of ``cs`` at ``s_values`` with ``style``; their bounds as open triangles
    pointing the way the optimum lies (down for "<=", up for ">=")."""
    measured = [(s, c.observed_optimum.value) for s, c in zip(s_values, cs) if c.observed_optimum.measured]
    if measured:
        ax.scatter(*zip(*measured), label=label, zorder=3, **style)
    for bound, marker in (("<=", "v"), (">=", "^")):
        points = [(s, c.observed_optimum.value) for s, c in zip(s_values, cs) if c.observed_optimum.bound == bound]
        if points:
            ax.scatter(*zip(*points), marker=marker, facecolors="none", edgecolors=style["color"], zorder=3,
                       label=f"{label}: bound f* {bound} x")


def _plot_fused_minus_classic(rows: list[dict], path: str) -> str:
    plt = _pyplot()
    pairs = fused_classic_pairs(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for i, bits in enumerate(sorted({b for b, _, _ in pairs})):
        points = [(f, diff) for b, f, diff in pairs if b == bits]
        ax.scatter([p[0] * (1 + 0.03 * i) for p in points], [p[1] for p in points], color=f"C{i}",
                   label=f"{bits_label(bits)}-bit")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("QAT fraction")
    ax.set_ylabel("loss(fused) - loss(classic), nats")
    ax.set_title("fusing the cooldown into QAT (below 0: fused is better)")
    return _finish(plt, fig, ax, path)
