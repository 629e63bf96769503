"""What a sweep's rows say about the paper's claims.

* A cell is one (size, seed, budget, bits, method): its fused-schedule losses at every QAT fraction,
  with fraction 0 = the PTQ row of that model (rows without ``method``, written before the sweep had
  the key, are the bit width's auto method).
* The observed optimal fraction of a cell (:func:`refined_optimum`): measured only where the grid
  brackets it, that is where the best QAT fraction has a measured QAT fraction on each side; then
  the argmin refined by a parabola in log f through it and its two neighbours (the three lowest
  points of a convex curve; our choice where the curve is not convex), the vertex kept between them.
  Otherwise a bound: best at the smallest QAT fraction (the PTQ row, fraction 0, worse) ->
  "<= the next fraction"; PTQ best -> "<= the smallest QAT fraction"; best at the largest fraction
  -> ">= the one below it".
* Against the paper: f_hat = exp(-6.7297 / ln S) at the cell's S, the mean absolute error, and the
  Spearman correlation of the observed optimum with S, over the cells with a measured optimum only,
  each with a 95% bootstrap interval over those cells (:func:`bootstrap_interval`); the bounds are
  counted apart, with how many of them f_hat satisfies.
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
    method: str = "auto"  # the quantizer family when not the bit width's auto one (e.g. a block-scaled FP4 family)

    @property
    def label(self) -> str:
        """The bit width ("4", "ternary"), with the method when not the auto one ("4-<method>")."""
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
    def observed_optimum(self) -> "Optimum":
        return refined_optimum(self.losses)


@dataclass(frozen=True)
class Optimum:
    """A cell's optimal QAT fraction: ``value`` measured between two grid points (``bound`` None), or a
    one-sided bound where the grid does not bracket it: the optimum is ``<= value`` or ``>= value``."""

    value: float
    bound: str | None = None

    @property
    def measured(self) -> bool:
        return self.bound is None

    def __str__(self) -> str:
        return f"{self.value:.3f}" if self.bound is None else f"{self.bound} {self.value:g}"

    def satisfied_by(self, fraction: float) -> bool:
        """Whether ``fraction`` (e.g. the paper's f_hat) is within the bound (a measured value: never)."""
        return (self.bound == "<=" and fraction <= self.value) or (self.bound == ">=" and fraction >= self.value)


def refined_optimum(losses: dict[float, float]) -> Optimum:
    """The optimum of fraction -> loss (0.0 = PTQ), measured where the grid brackets it, else a bound.

    The best QAT fraction with a measured QAT fraction on each side: the parabola in log f through it
    and its two neighbours, its vertex kept between them (the best fraction itself when the three points
    are not convex). At the grid's lower edge the PTQ row closes the bracket from below: best at the
    smallest QAT fraction (PTQ worse) -> the optimum lies below the next fraction, ``<= next``; PTQ best
    -> ``<= smallest``. Best at the largest fraction -> ``>= the one below it``."""
    best = min(losses, key=losses.get)
    positive = sorted(f for f in losses if f > 0)
    if best == 0.0:
        return Optimum(positive[0] if positive else 0.0, "<=")
    i = positive.index(best)
    if len(positive) == 1:
        return Optimum(0.0, ">=")  # one QAT fraction, better than PTQ: nothing but > 0
    if i == 0:
        return Optimum(positive[1], "<=")
    if i == len(positive) - 1:
        return Optimum(positive[-2], ">=")
    points = positive[i - 1:i + 2]
    a, b, _ = np.polyfit(np.log(points), [losses[f] for f in points], 2)
    if a <= 0:
        return Optimum(best)
    return Optimum(float(min(max(math.exp(-b / (2 * a)), points[0]), points[-1])))


def bootstrap_interval(samples, statistic, resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile interval of ``statistic`` over ``resamples`` resamplings (with
    replacement) of the rows of ``samples`` (an array, first axis = cells); statistics that are not
    finite on a resample (a Spearman correlation of tied values) are left out. (nan, nan) for fewer
    than 3 cells."""
    samples = np.asarray(samples, dtype=np.float64)
    if len(samples) < 3:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(samples[rng.integers(0, len(samples), len(samples))]) for _ in range(resamples)])
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def row_method(row: dict) -> str:
    """The quantizer family of a row as a cell tells them apart: "auto" when the bit width's auto family
    (or the row predates the ``method`` field), else its name."""
    method = row.get("method")
    if row.get("bits") is None or method is None or method == auto_method(float(row["bits"])):
        return "auto"
    return method


def format_label(bits: float, method: str = "auto") -> str:
    """"4", "ternary", or "4-<method>" for a method other than the bit width's auto one."""
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


def _mae(pairs: np.ndarray) -> float:
    return float(np.mean(np.abs(pairs[:, 0] - pairs[:, 1])))


def _spearman_columns(pairs: np.ndarray) -> float:
    return spearman(list(pairs[:, 0]), list(pairs[:, 1]))


def paper_comparison(cell_list: list[Cell]) -> dict[str, dict]:
    """Against f_hat, all cells and per bit width: over the cells with a measured optimum, the MAE of
    f_hat and Spearman(observed optimum, S), each with its 95% bootstrap interval over those cells, and
    the mean signed error (observed - f_hat; > 0: the formula under-plans) with its interval; the
    bounds counted apart, with how many of them f_hat satisfies."""
    def stats(cs: list[Cell]) -> dict:
        measured = [c for c in cs if c.observed_optimum.measured]
        bounds = [c for c in cs if not c.observed_optimum.measured]
        observed = np.array([c.observed_optimum.value for c in measured])
        predicted = np.array([c.paper_fraction for c in measured])
        s = [c.tokens_per_param_byte for c in cs]
        pairs = np.column_stack([observed, predicted]) if measured else np.zeros((0, 2))
        ranks = np.column_stack([[c.tokens_per_param_byte for c in measured], observed]) if measured else pairs
        signed = (observed - predicted)[:, None]
        return {"cells": len(cs), "measured": len(measured), "bounds": len(bounds),
                "bounds_satisfied_by_f_hat": sum(c.observed_optimum.satisfied_by(c.paper_fraction) for c in bounds),
                "mae": _mae(pairs) if measured else float("nan"), "mae_interval": bootstrap_interval(pairs, _mae),
                "mean_signed_error": float(np.mean(signed)) if measured else float("nan"),
                "mean_signed_error_interval": bootstrap_interval(signed, lambda x: float(np.mean(x))),
                "spearman_optimum_vs_S": _spearman_columns(ranks) if measured else float("nan"),
                "spearman_interval": bootstrap_interval(ranks, _spearman_columns),
                "S_min": min(s, default=float("nan")), "S_max": max(s, default=float("nan"))}

    out = {"all": stats(cell_list)}
    for bits, method in sorted({(c.bits, c.method) for c in cell_list}):
        key = f"{bits:g}" + ("" if method == "auto" else f"-{method}")
        out[key] = stats([c for c in cell_list if c.bits == bits and c.method == method])
    return out


def moe_comparison(cell_list: list[Cell]) -> dict[str, dict] | None:
    """For sweeps with mixtures of experts, over the MoE cells with a measured optimum: the MAE of f_hat
    with N = total and with N = active parameters, each with its bootstrap interval, and the interval of
    their difference (total - active, the same resamples of cells: > 0 favours N = active); the MoE
    bounds apart, with how many each N's f_hat satisfies; the dense cells' MAE for reference (None
    without MoE cells)."""
    moe = [c for c in cell_list if c.active_params]
    if not moe:
        return None
    measured = [c for c in moe if c.observed_optimum.measured]
    bounds = [c for c in moe if not c.observed_optimum.measured]
    dense = [c for c in cell_list if not c.active_params and c.observed_optimum.measured]
    # per cell: |error| with N = total, with N = active
    errors = np.array([[abs(c.observed_optimum.value - c.paper_fraction_with(n)) for n in ("total", "active")]
                       for c in measured]).reshape(-1, 2)

    def mean(column: int):
        return lambda x: float(np.mean(x[:, column]))

    def difference(x: np.ndarray) -> float:
        return float(np.mean(x[:, 0] - x[:, 1]))

    nan = float("nan")
    return {"moe": {"cells": len(moe), "measured": len(measured), "bounds": len(bounds),
                    "mae_total": mean(0)(errors) if measured else nan,
                    "mae_total_interval": bootstrap_interval(errors, mean(0)),
                    "mae_active": mean(1)(errors) if measured else nan,
                    "mae_active_interval": bootstrap_interval(errors, mean(1)),
                    "total_minus_active": difference(errors) if measured else nan,
                    "total_minus_active_interval": bootstrap_interval(errors, difference),
                    "bounds_satisfied_total": sum(c.observed_optimum.satisfied_by(c.paper_fraction_with("total"))
                                                  for c in bounds),
                    "bounds_satisfied_active": sum(c.observed_optimum.satisfied_by(c.paper_fraction_with("active"))
                                                   for c in bounds)},
            "dense": {"cells": len(dense),
                      "mae": float(np.mean([abs(c.observed_optimum.value - c.paper_fraction) for c in dense]))
                      if dense else nan}}


def optimum_seed_spread(cell_list: list[Cell]) -> list[dict]:
    """Cells trained with more than one seed: each seed's optimum (measured or a bound) and, where every
    seed's is measured, their spread (max - min)."""
    groups: dict[tuple, list[Cell]] = {}
    for c in cell_list:
        groups.setdefault((c.size, c.budget, c.bits, c.method), []).append(c)
    out = []
    for (size, budget, bits, method), cs in groups.items():
        if len(cs) < 2:
            continue
        optima = [c.observed_optimum for c in sorted(cs, key=lambda c: c.seed)]
        values = [o.value for o in optima if o.measured]
        out.append({"key": f"{size}/{budget:g}/{format_label(bits, method)}", "seeds": len(cs),
                    "optima": [str(o) for o in optima],
                    "spread": max(values) - min(values) if len(values) == len(optima) else None})
    return out


def fused_classic_pairs(rows: list[dict]) -> list[tuple[float, float, float]]:
    """``(bits, fraction, loss(fused) - loss(classic))`` for every classic row with a fused twin (of the
    same method)."""
    fused = {_match(r): r["loss"] for r in rows if r["schedule"] == "fused"}
    return [(float(r["bits"]), float(r["fraction"]), fused[_match(r)] - r["loss"])
            for r in rows if r["schedule"] == "classic" and _match(r) in fused]


def fused_minus_classic(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per bit width (and method, when not the auto one: "4-<method>"): mean, min and max of loss(fused) -
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
