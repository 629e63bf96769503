"""What a sweep's rows say about the paper's claims (arXiv 2509.22935).

* A cell is one (size, seed, budget, bits, method): its fused-schedule losses at every QAT fraction,
  with fraction 0 = the PTQ row of that model (rows without ``method``, written before the sweep had
  the key, are the bit width's auto method).
* The observed optimal fraction of a cell: the argmin over the measured fractions, refined by a
  parabola in log f through the argmin and its two neighbours (the three lowest points of a convex
  curve; our choice where the curve is not convex), the vertex kept inside them; 0 when PTQ is the
  best row.
* Against the paper: f_hat = exp(-6.7297 / ln S) at the cell's S, the mean absolute error, and the
  Spearman correlation of the observed optimum with S.
* Fused minus classic: the loss difference of the same (size, seed, budget, bits, fraction), per bit
  width (negative: the fused schedule is better).
* Noise: the same cell trained with two seeds.
* Mixtures of experts: f_hat with N = total or N = active parameters against the observed optima.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..bits import bits_label
from ..config import auto_method
from ..planner.fraction import optimal_qat_fraction, tokens_per_parameter_byte

QAT_SCHEDULES = ("fused", "classic")


@dataclass
class Cell:
    size: str
    seed: int
    budget: float
    bits: float
    num_params: int
    tokens: int
    losses: dict[float, float] = field(default_factory=dict)  # fraction -> loss (0.0 = PTQ)
    fp_loss: float | None = None
    active_params: int | None = None  # a mixture of experts: the parameters one token uses
    method: str = "auto"  # the quantizer family when not the bit width's auto one (e.g. "mxfp4")

    @property
    def label(self) -> str:
        """The bit width ("4", "ternary"), with the method when not the auto one ("4-mxfp4")."""
        return format_label(self.bits, self.method)

    @property
    def tokens_per_param_byte(self) -> float:
        return tokens_per_parameter_byte(self.num_params, self.tokens, self.bits)

    @property
    def paper_fraction(self) -> float:
        return optimal_qat_fraction(self.tokens_per_param_byte)

    def paper_fraction_with(self, n: str) -> float:
        """f_hat with N = every parameter ("total") or the active ones ("active"; a dense model's own N)."""
        params = self.active_params if n == "active" and self.active_params else self.num_params
        return optimal_qat_fraction(tokens_per_parameter_byte(params, self.tokens, self.bits))

    @property
    def observed_optimum(self) -> float:
        return refined_optimum(self.losses)


def refined_optimum(losses: dict[float, float]) -> float:
    """The argmin fraction, refined by a parabola in log f through the argmin and its two neighbours
    among the measured f > 0 (the two nearest at an end of the range); the vertex is kept between the
    outer two points. 0 when PTQ (fraction 0) is the best row."""
    best = min(losses, key=losses.get)
    if best == 0.0:
        return 0.0
    positive = sorted(f for f in losses if f > 0)
    if len(positive) < 3:
        return best
    i = min(max(positive.index(best), 1), len(positive) - 2)
    points = positive[i - 1:i + 2]
    x = np.log(points)
    a, b, _ = np.polyfit(x, [losses[f] for f in points], 2)
    if a <= 0:
        return best
    return float(min(max(math.exp(-b / (2 * a)), points[0]), points[-1]))


def row_method(row: dict) -> str:
    """The quantizer family of a row as a cell tells them apart: "auto" when the bit width's auto family
    (or the row predates the ``method`` field), else its name."""
    method = row.get("method")
    if row.get("bits") is None or method is None or method == auto_method(float(row["bits"])):
        return "auto"
    return method


def format_label(bits: float, method: str = "auto") -> str:
    """"4", "ternary", or "4-mxfp4" for a method other than the bit width's auto one."""
    return bits_label(bits) + ("" if method == "auto" else f"-{method}")


def cells(rows: list[dict], schedule: str = "fused") -> list[Cell]:
    """The cells of ``rows`` with at least one ``schedule`` row, each with its PTQ row as fraction 0."""
    out: dict[tuple, Cell] = {}
    fp: dict[tuple, float] = {}
    for row in rows:
        base = (row["size"], row["seed"], float(row["budget"]))
        if row["schedule"] == "fp":
            fp[base] = row["loss"]
            continue
        if row["schedule"] not in (schedule, "ptq"):
            continue
        key = base + (float(row["bits"]), row_method(row))
        cell = out.setdefault(key, Cell(row["size"], row["seed"], float(row["budget"]), float(row["bits"]),
                                        int(row["num_params"]), int(row["fp_tokens"]) + int(row["qat_tokens"]),
                                        active_params=row.get("active_params"), method=row_method(row)))
        cell.losses[float(row["fraction"])] = float(row["loss"])
    result = [c for c in out.values() if any(f > 0 for f in c.losses)]
    for cell in result:
        cell.fp_loss = fp.get((cell.size, cell.seed, cell.budget))
    return sorted(result, key=lambda c: (c.bits, c.method, c.num_params, c.budget, c.seed))


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def paper_comparison(cell_list: list[Cell]) -> dict[str, float]:
    """MAE of f_hat against the observed optima, and Spearman(observed optimum, S), all cells and per bits."""
    def stats(cs: list[Cell]) -> dict[str, float]:
        observed = [c.observed_optimum for c in cs]
        predicted = [c.paper_fraction for c in cs]
        s = [c.tokens_per_param_byte for c in cs]
        return {"cells": len(cs), "mae": float(np.mean(np.abs(np.subtract(observed, predicted)))) if cs else float("nan"),
                "spearman_optimum_vs_S": spearman(s, observed), "S_min": min(s, default=float("nan")),
                "S_max": max(s, default=float("nan"))}

    out = {"all": stats(cell_list)}
    for bits, method in sorted({(c.bits, c.method) for c in cell_list}):
        key = f"{bits:g}" + ("" if method == "auto" else f"-{method}")
        out[key] = stats([c for c in cell_list if c.bits == bits and c.method == method])
    return out


def moe_comparison(cell_list: list[Cell]) -> dict[str, dict[str, float]] | None:
    """For sweeps with mixtures of experts: the MAE of f_hat against the observed optima of the MoE cells
    with N = total and with N = active parameters, and the dense cells' MAE for reference (None without
    MoE cells)."""
    moe = [c for c in cell_list if c.active_params]
    if not moe:
        return None
    dense = [c for c in cell_list if not c.active_params]

    def mae(cs: list[Cell], n: str) -> float:
        return float(np.mean([abs(c.observed_optimum - c.paper_fraction_with(n)) for c in cs])) if cs else float("nan")

    return {"moe": {"cells": len(moe), "mae_total": mae(moe, "total"), "mae_active": mae(moe, "active")},
            "dense": {"cells": len(dense), "mae": mae(dense, "total")}}


def fused_classic_pairs(rows: list[dict]) -> list[tuple[float, float, float]]:
    """``(bits, fraction, loss(fused) - loss(classic))`` for every classic row with a fused twin (of the
    same method)."""
    fused = {_match(r): r["loss"] for r in rows if r["schedule"] == "fused"}
    return [(float(r["bits"]), float(r["fraction"]), fused[_match(r)] - r["loss"])
            for r in rows if r["schedule"] == "classic" and _match(r) in fused]


def fused_minus_classic(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per bit width (and method, when not the auto one: "4-mxfp4"): mean, min and max of loss(fused) -
    loss(classic) over matching runs."""
    diffs: dict[str, list[float]] = {}
    fused = {_match(r): r["loss"] for r in rows if r["schedule"] == "fused"}
    for r in rows:
        if r["schedule"] == "classic" and _match(r) in fused:
            method = row_method(r)
            diffs.setdefault(f"{float(r['bits']):g}" + ("" if method == "auto" else f"-{method}"), []).append(
                fused[_match(r)] - r["loss"])
    return {bits: {"pairs": len(v), "mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for bits, v in sorted(diffs.items())}


def seed_noise(rows: list[dict]) -> list[dict[str, float]]:
    """Rows that exist for more than one seed: the spread of their losses."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        key = (row["size"], float(row["budget"]), row["bits"], float(row["fraction"]), row["schedule"])
        if row_method(row) != "auto":
            key += (row_method(row),)
        groups.setdefault(key, []).append(row["loss"])
    return [{"key": "/".join(str(k) for k in key), "seeds": len(v), "spread": max(v) - min(v)}
            for key, v in groups.items() if len(v) > 1]


def _match(row: dict) -> tuple:
    return row["size"], row["seed"], float(row["budget"]), float(row["bits"]), float(row["fraction"]), row_method(row)
