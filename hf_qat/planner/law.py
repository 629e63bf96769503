"""The loss scaling law of compute-optimal QAT (arXiv 2509.22935), and its fit.

    L(N, D_fp, D_qat, B) = E + A / N^alpha + Bc / D_total^beta                      (Chinchilla part)
                         + theta  * 2^(-kappa * B)                                    (precision floor)
                         + phi    * 2^(-chi * B) / (N^psi * S'_qat^omega)             (too little QAT)
                         + lam    * 2^(-mu * B)  / (N^nu * S'_fp^xi * S'_qat^rho)     (FP/QAT interaction)

with S_x = D_x / (N * B / 8) and **(our choice)** S'_x = 1 + S_x, so that QAT from scratch
(D_fp = 0) and PTQ (D_qat = 0) stay finite. Runs with ``bits=None`` (FP-only, evaluated in full
precision) are predicted by the Chinchilla part alone and pin it.

Fitting **(our choice, following Chinchilla practice)**: Huber loss (delta 1e-3) on log-loss residuals,
L-BFGS-B with exact float64 gradients (torch autograd) from a set of starting points whose linear
coefficients come from non-negative least squares for sampled exponents; the best fit is kept.
Diagnostics: residuals, and optional bootstrap refits for prediction intervals.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from scipy.optimize import minimize, minimize_scalar, nnls

from ..bits import TERNARY_BITS, normalize_bits
from ..counts import human
from ..jsonio import write_json
from .fraction import effective_bits

FORM = "hf_qat/compute-optimal-qat-law/v1"
PARAMS = ("E", "A", "alpha", "B", "beta", "theta", "kappa", "phi", "chi", "psi", "omega",
          "lam", "mu", "nu", "xi", "rho")
# Coefficients are fitted as logs (kept positive); exponents directly, within these bounds.
LOG_PARAMS = ("E", "A", "B", "theta", "phi", "lam")
LOG_BOUND = (-40.0, 40.0)
BOUNDS = {
    "alpha": (0.0, 1.5), "beta": (0.0, 1.5), "kappa": (0.0, 4.0), "chi": (0.0, 4.0), "psi": (-0.5, 1.5),
    "omega": (0.0, 3.0), "mu": (0.0, 4.0), "nu": (-0.5, 1.5), "xi": (-2.0, 2.0), "rho": (0.0, 3.0),
    **{k: LOG_BOUND for k in LOG_PARAMS},
}
# Which features each coefficient's term raises to which exponent (for centring, see _centre).
TERM_EXPONENTS = {
    "E": (), "A": (("alpha", "ln_n"),), "B": (("beta", "ln_d"),), "theta": (("kappa", "b_ln2"),),
    "phi": (("chi", "b_ln2"), ("psi", "ln_n"), ("omega", "ln_sqat")),
    "lam": (("mu", "b_ln2"), ("nu", "ln_n"), ("xi", "ln_sfp"), ("rho", "ln_sqat")),
}
HUBER_DELTA = 1e-3
# Two predicted losses closer than this (relative) are a tie: far below any fit's error, so no ranking.
TIE_RELATIVE = 1e-4
RUN_KEYS = ("num_params", "fp_tokens", "qat_tokens", "bits", "loss")

# An ILLUSTRATIVE law for tests of the fitter only: invented constants (Chinchilla-like, plus
# quantization terms) whose optimal QAT fraction grows with tokens per parameter byte (about 0.14 at
# S=30 to 0.8 at S=1e5). It is not the paper's law (the paper's formula gives 0.557 at S=1e5) and no
# run was fitted to get it; for a law fitted on real runs see recipes/laws/.
ILLUSTRATIVE_PARAMS = dict(E=1.8, A=400.0, alpha=0.34, B=410.0, beta=0.28, theta=0.3, kappa=1.0, phi=0.5,
                           chi=0.8, psi=0.05, omega=0.3, lam=20.0, mu=0.7, nu=0.05, xi=0.9, rho=0.1)


# ---------------------------------------------------------------------------------------- runs
@dataclass
class Runs:
    """Training runs as arrays: N, D_fp, D_qat, B (NaN = FP-only), loss."""

    num_params: np.ndarray
    fp_tokens: np.ndarray
    qat_tokens: np.ndarray
    bits: np.ndarray
    loss: np.ndarray

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, index: np.ndarray) -> "Runs":
        return Runs(*(getattr(self, k)[index] for k in ("num_params", "fp_tokens", "qat_tokens", "bits", "loss")))


def _bits_value(value: Any) -> float:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "fp", "none", "16", "bf16", "fp16", "32")):
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 16:
        return math.nan
    bits = normalize_bits(value)
    return effective_bits(bits) if bits == TERNARY_BITS else float(bits)


def load_runs(source: str | os.PathLike | Iterable[dict] | Runs) -> Runs:
    """Runs from a list of dicts, a CSV file or a JSONL file, each with the keys
    ``num_params, fp_tokens, qat_tokens, bits, loss`` (bits empty / "fp" / None for FP-only runs)."""
    if isinstance(source, Runs):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        with open(path, encoding="utf-8") as fh:
            if path.endswith((".jsonl", ".json")):
                text = fh.read().strip()
                rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                rows = list(csv.DictReader(fh))
    else:
        rows = list(source)
    if not rows:
        raise ValueError("no runs to fit")
    for i, row in enumerate(rows):
        missing = [k for k in RUN_KEYS if k not in row]
        if missing:
            raise ValueError(f"run {i} lacks {', '.join(missing)}; every run needs {', '.join(RUN_KEYS)}")
    runs = Runs(
        num_params=np.array([float(r["num_params"]) for r in rows]),
        fp_tokens=np.array([float(r["fp_tokens"]) for r in rows]),
        qat_tokens=np.array([float(r["qat_tokens"]) for r in rows]),
        bits=np.array([_bits_value(r["bits"]) for r in rows]),
        loss=np.array([float(r["loss"]) for r in rows]),
    )
    if (runs.num_params <= 0).any() or (runs.fp_tokens < 0).any() or (runs.qat_tokens < 0).any() or (runs.loss <= 0).any():
        raise ValueError("runs need num_params > 0, tokens >= 0 and loss > 0")
    if ((runs.fp_tokens + runs.qat_tokens) <= 0).any():
        raise ValueError("every run needs fp_tokens + qat_tokens > 0")
    return runs


# ---------------------------------------------------------------------------------------- the form
def _features(runs: Runs) -> dict[str, torch.Tensor]:
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    n = t(runs.num_params)
    fp_only = torch.isnan(t(runs.bits))
    bits = torch.where(fp_only, torch.full_like(n, 16.0), t(runs.bits))
    byte_params = n * bits / 8.0
    return {
        "ln_n": torch.log(n),
        "ln_d": torch.log(t(runs.fp_tokens) + t(runs.qat_tokens)),
        "b_ln2": bits * math.log(2.0),
        "ln_sfp": torch.log1p(t(runs.fp_tokens) / byte_params),
        "ln_sqat": torch.log1p(t(runs.qat_tokens) / byte_params),
        "quant": (~fp_only).to(torch.float64),
    }


def _terms(x: torch.Tensor, f: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The six additive terms (E, A, B, theta, phi, lam parts) for the parameter vector ``x``."""
    p = dict(zip(PARAMS, x))
    q = f["quant"]
    return [
        torch.exp(p["E"]).expand_as(f["ln_n"]),
        torch.exp(p["A"] - p["alpha"] * f["ln_n"]),
        torch.exp(p["B"] - p["beta"] * f["ln_d"]),
        q * torch.exp(p["theta"] - p["kappa"] * f["b_ln2"]),
        q * torch.exp(p["phi"] - p["chi"] * f["b_ln2"] - p["psi"] * f["ln_n"] - p["omega"] * f["ln_sqat"]),
        q * torch.exp(p["lam"] - p["mu"] * f["b_ln2"] - p["nu"] * f["ln_n"] - p["xi"] * f["ln_sfp"]
                      - p["rho"] * f["ln_sqat"]),
    ]


def _predict(x: torch.Tensor, f: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(_terms(x, f))


def _huber(r: torch.Tensor, delta: float = HUBER_DELTA) -> torch.Tensor:
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


# ---------------------------------------------------------------------------------------- the law
@dataclass
class QATScalingLaw:
    """A fitted (or given) loss law. ``params`` maps the names of :data:`PARAMS` to values (the
    coefficients E, A, B, theta, phi, lam as plain positive numbers)."""

    params: dict[str, float]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    bootstrap_params: list[dict[str, float]] = field(default_factory=list)

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        missing = [k for k in PARAMS if k not in self.params]
        if missing:
            raise ValueError(f"a QATScalingLaw needs the parameters {', '.join(missing)}")
        for k in LOG_PARAMS:
            if not self.params[k] > 0:
                raise ValueError(f"law parameter {k} must be > 0, got {self.params[k]}")

    @staticmethod
    def _to_vector(params: dict[str, float]) -> np.ndarray:
        return np.array([math.log(params[k]) if k in LOG_PARAMS else params[k] for k in PARAMS])

    @staticmethod
    def _from_vector(x: Sequence[float]) -> dict[str, float]:
        return {k: float(math.exp(v) if k in LOG_PARAMS else v) for k, v in zip(PARAMS, x)}

    @classmethod
    def fit(
        cls,
        runs: str | os.PathLike | Iterable[dict] | Runs,
        starts: int = 24,
        seed: int = 0,
        bootstrap: int = 0,
        max_iter: int = 3000,
    ) -> "QATScalingLaw":
        """Fit the law to ``runs`` (see :func:`load_runs`) from up to ``starts`` starting points (it stops
        early once three of them reach the same best optimum); ``bootstrap`` > 0 adds that many refits
        on resampled runs for prediction intervals."""
        data = load_runs(runs)
        with _one_thread():
            return cls._fit(data, starts, seed, bootstrap, max_iter)

    @classmethod
    def _fit(cls, data: Runs, starts: int, seed: int, bootstrap: int, max_iter: int) -> "QATScalingLaw":
        started = time.perf_counter()
        feats, centres = _centre(_features(data))
        target = torch.log(torch.as_tensor(data.loss, dtype=torch.float64))
        rng = np.random.default_rng(seed)
        best, hits, tried = None, 0, 0
        for _ in range(starts):
            x, value = _polish(_nnls_start(feats, data.loss, rng), feats, target, max_iter)
            tried += 1
            if best is None or value < best[1] * (1 - 1e-9):
                best, hits = (x, value), 1
            elif value <= best[1] * (1 + 1e-9):
                hits += 1
            if hits >= 3:  # the same best optimum from three starts: stop
                break
        law = cls(cls._from_vector(_uncentre(best[0], centres)))
        law.diagnostics = law._diagnostics(data, objective=best[1], seconds=time.perf_counter() - started,
                                           starts=tried)
        if bootstrap:
            law.bootstrap(data, bootstrap, seed=seed + 1, max_iter=max_iter)
        return law

    def bootstrap(self, runs, samples: int = 50, seed: int = 1, max_iter: int = 3000) -> list[dict[str, float]]:
        """Refit on ``samples`` resamplings (with replacement) of ``runs``, starting from this fit."""
        data = load_runs(runs)
        rng = np.random.default_rng(seed)
        with _one_thread():
            out = [self._refit(data.subset(rng.integers(0, len(data), len(data))), max_iter) for _ in range(samples)]
        self.bootstrap_params = out
        self.diagnostics["bootstrap_samples"] = samples
        return out

    def _refit(self, sub: Runs, max_iter: int) -> dict[str, float]:
        """One refit on ``sub``, starting from this law's parameters."""
        feats, centres = _centre(_features(sub))
        target = torch.log(torch.as_tensor(sub.loss, dtype=torch.float64))
        x, _ = _polish(_recentre(self._to_vector(self.params), centres), feats, target, max_iter)
        return self._from_vector(_uncentre(x, centres))

    def _diagnostics(self, data: Runs, objective: float, seconds: float, starts: int) -> dict[str, Any]:
        predicted = self.predict_runs(data)
        rel = predicted / data.loss - 1.0
        return {
            "runs": len(data),
            "objective": objective,
            "fit_seconds": round(seconds, 3),
            "starts": starts,
            "rmse_log_residual": float(np.sqrt(np.mean(np.log(predicted / data.loss) ** 2))),
            "max_abs_relative_error": float(np.max(np.abs(rel))),
            "mean_abs_relative_error": float(np.mean(np.abs(rel))),
            "residuals": [float(v) for v in np.log(predicted / data.loss)],
            "fitted_range": fitted_range(data),
        }

    # ------------------------------------------------------------------ validity
    def range_warning(self, num_params: float | Sequence[float], total_tokens: float,
                      bits: Sequence = ()) -> str | None:
        """Why predictions at N = ``num_params`` (one or several), D = ``total_tokens`` and the bit widths ``bits``
        are an extrapolation (they leave the N or D range of the runs the law was fitted on, or use a bit width
        none of its QAT runs had: ``diagnostics["fitted_range"]``; a law fitted before the bit widths were
        recorded judges N and D only), or None."""
        fitted = self.diagnostics.get("fitted_range")
        if not fitted:
            return None
        outside = []
        for label, values, (lo, hi) in (("N", np.atleast_1d(num_params), fitted["num_params"]),
                                        ("D", np.atleast_1d(total_tokens), fitted["tokens"])):
            if ((values < lo * (1 - 1e-9)) | (values > hi * (1 + 1e-9))).any():
                shown = human(values.min()) if values.min() == values.max() else f"{human(values.min())} to {human(values.max())}"
                outside.append(f"{label}={shown} (fitted on {human(lo)} to {human(hi)})")
        unseen = sorted({v for b in bits if not math.isnan(v := _bits_value(b))} - set(fitted.get("bits", ())))
        if "bits" in fitted and unseen:
            outside.append(f"B={', '.join(f'{b:.3g}' for b in unseen)} (fitted on B="
                           f"{', '.join(f'{b:.3g}' for b in fitted['bits']) or 'none'})")
        if not outside:
            return None
        return (f"{' and '.join(outside)} {'lie' if len(outside) > 1 else 'lies'} outside the runs the law was fitted "
                "on: its predicted losses are an extrapolation")

    # ------------------------------------------------------------------ prediction
    def predict_runs(self, runs: Runs, params: dict[str, float] | None = None) -> np.ndarray:
        x = torch.as_tensor(self._to_vector(params or self.params))
        with torch.no_grad():
            return _predict(x, _features(runs)).numpy()

    def predict(self, num_params, fp_tokens, qat_tokens, bits) -> float | np.ndarray:
        """Predicted final loss; arguments may be scalars or arrays (``bits=None``: an FP model)."""
        arrays = np.broadcast_arrays(
            np.asarray(num_params, dtype=np.float64), np.asarray(fp_tokens, dtype=np.float64),
            np.asarray(qat_tokens, dtype=np.float64),
        )
        shape = arrays[0].shape
        bit_value = np.full(shape, _bits_value(bits))
        runs = Runs(arrays[0].ravel(), arrays[1].ravel(), arrays[2].ravel(), bit_value.ravel(), np.ones(arrays[0].size))
        out = self.predict_runs(runs).reshape(shape)
        return float(out) if out.ndim == 0 else out

    def predict_interval(self, num_params, fp_tokens, qat_tokens, bits, level: float = 0.9) -> tuple[float, float]:
        """A bootstrap interval of the prediction (needs :meth:`bootstrap` or ``fit(bootstrap=n)``)."""
        if not self.bootstrap_params:
            raise ValueError("no bootstrap refits: call law.bootstrap(runs) or fit(..., bootstrap=50) first")
        values = [
            float(QATScalingLaw(p).predict(num_params, fp_tokens, qat_tokens, bits)) for p in self.bootstrap_params
        ]
        lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)

    def simulate_runs(
        self,
        sizes: Sequence[float],
        bits: Sequence,
        tokens_per_param: Sequence[float],
        fractions: Sequence[float],
        noise: float = 0.0,
        seed: int = 0,
        fp_only: bool = True,
    ) -> list[dict[str, Any]]:
        """Runs whose losses this law predicts, times ``1 + noise * N(0, 1)``: every size x budget
        (``tokens_per_param * size`` tokens) x bit width x QAT fraction, plus one FP-only run per size
        and budget when ``fp_only``."""
        rng = np.random.default_rng(seed)
        runs = []
        for n in sizes:
            for per_param in tokens_per_param:
                d = per_param * n
                if fp_only:
                    loss = float(self.predict(n, d, 0.0, None)) * (1 + noise * rng.standard_normal())
                    runs.append(dict(num_params=n, fp_tokens=d, qat_tokens=0.0, bits=None, loss=loss))
                for b in bits:
                    for f in fractions:
                        loss = float(self.predict(n, (1 - f) * d, f * d, b)) * (1 + noise * rng.standard_normal())
                        runs.append(dict(num_params=n, fp_tokens=(1 - f) * d, qat_tokens=f * d, bits=b, loss=loss))
        return runs

    def loss_curve(self, num_params: float, total_tokens: float, bits, fractions: np.ndarray) -> np.ndarray:
        """Predicted loss at each QAT fraction ``f`` of ``total_tokens``."""
        fractions = np.asarray(fractions, dtype=np.float64)
        return np.asarray(self.predict(num_params, (1 - fractions) * total_tokens, fractions * total_tokens, bits))

    def optimal_fraction(self, num_params: float, total_tokens: float, bits, pretrained_tokens: float = 0.0) -> float:
        """The QAT fraction of ``total_tokens`` that minimises the predicted loss. With
        ``pretrained_tokens`` (part of ``total_tokens``, all FP) the fraction cannot exceed
        ``1 - pretrained_tokens / total_tokens``."""
        if total_tokens <= 0:
            raise ValueError(f"total_tokens must be > 0, got {total_tokens}")
        f_max = max(0.0, 1.0 - pretrained_tokens / total_tokens)
        grid = np.linspace(0.0, f_max, 201)
        values = self.loss_curve(num_params, total_tokens, bits, grid)
        i = int(np.argmin(values))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        if hi <= lo:
            return float(grid[i])
        res = minimize_scalar(
            lambda f: float(self.loss_curve(num_params, total_tokens, bits, np.array([f]))[0]),
            bounds=(lo, hi), method="bounded", options={"xatol": 1e-6},
        )
        return float(res.x) if res.fun <= values[i] else float(grid[i])

    def best_bits(
        self, memory_bytes: float, total_tokens: float, candidates: Sequence = (1, TERNARY_BITS, 2, 3, 4, 6, 8)
    ) -> "BitsChoice":
        """The weight format with the lowest predicted loss when the quantized weights must fit in
        ``memory_bytes``: for each candidate (a bit width B, or a format such as a block-scaled family's name,
        "int4-g32": :func:`~hf_qat.planner.storage.weight_format`), N = 8 * memory / (its bits per weight in
        memory), its optimal QAT fraction, its loss predicted at its B. The law knows B only: formats of
        one B differ here by the parameters their scales leave room for, not by their element grids."""
        from .storage import weight_format

        rows = []
        for candidate in candidates:
            fmt = weight_format(candidate)
            n = 8.0 * memory_bytes / fmt.storage_bits
            f = self.optimal_fraction(n, total_tokens, fmt.bits)
            loss = float(self.predict(n, (1 - f) * total_tokens, f * total_tokens, fmt.bits))
            rows.append({"bits": fmt.bits, "format": fmt.name, "storage_bits": fmt.storage_bits, "num_params": n,
                         "qat_fraction": f, "predicted_loss": loss})
        text = self.range_warning([r["num_params"] for r in rows], total_tokens, [r["bits"] for r in rows])
        rows.sort(key=lambda r: r["predicted_loss"])
        best = rows[0]["predicted_loss"]
        ties = [r for r in rows if r["predicted_loss"] <= best * (1 + TIE_RELATIVE)]
        return BitsChoice(best=rows[0], candidates=rows, ties=ties if len(ties) > 1 else [],
                          warnings=[text] if text else [])

    def equivalent_fp_params(self, num_params: float, total_tokens: float, bits) -> float:
        """The size of an FP model (same tokens) whose predicted loss equals the B-bit model's at its
        optimal QAT fraction: where QAT matches FP."""
        f = self.optimal_fraction(num_params, total_tokens, bits)
        target = float(self.predict(num_params, (1 - f) * total_tokens, f * total_tokens, bits))
        fp = lambda n: float(self.predict(n, total_tokens, 0.0, None)) - target  # noqa: E731
        lo, hi = 1e-3 * num_params, num_params
        if fp(hi) > 0:
            return num_params
        if fp(lo) < 0:
            return lo
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if fp(mid) > 0 else (lo, mid)
        return math.sqrt(lo * hi)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {"form": FORM, "params": dict(self.params), "diagnostics": self.diagnostics,
                "bootstrap_params": self.bootstrap_params}

    def save(self, path: str | os.PathLike) -> str:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QATScalingLaw":
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if data.get("form") != FORM:
            raise ValueError(f"{path} is not a hf_qat law file (form {data.get('form')!r}, expected {FORM!r})")
        return cls(params={k: float(v) for k, v in data["params"].items()},
                   diagnostics=data.get("diagnostics", {}), bootstrap_params=data.get("bootstrap_params", []))


@dataclass
class BitsChoice:
    """The answer of :meth:`QATScalingLaw.best_bits`: the best row and every candidate's row; ``ties`` when
    several candidates share the lowest predicted loss (then ``best`` is one of them, not a winner)."""

    best: dict[str, Any]
    candidates: list[dict[str, Any]]
    ties: list[dict[str, Any]] = field(default_factory=list)  # the rows tied with the best (TIE_RELATIVE), or []
    warnings: list[str] = field(default_factory=list)  # candidates whose N or D leave the fitted range


def fitted_range(runs: Runs) -> dict[str, list[float]]:
    """The N and D (= fp + QAT tokens) ranges of ``runs``: where a law fitted on them predicts without
    extrapolating."""
    tokens = runs.fp_tokens + runs.qat_tokens
    return {"num_params": [float(runs.num_params.min()), float(runs.num_params.max())],
            "tokens": [float(tokens.min()), float(tokens.max())],
            "bits": sorted({float(b) for b in runs.bits if np.isfinite(b)})}


# ---------------------------------------------------------------------------------------- fitting
@contextlib.contextmanager
def _one_thread():
    """The fit works on tensors of a few hundred elements: intra-op threads only spin against
    scipy's optimizer (seen: 10x slower with torch.set_num_threads(2) on 2 cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _centre(feats: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Features minus their means. Fitting the coefficients at the centre decorrelates each
    coefficient from its exponents (ln N is about 18), which L-BFGS-B needs to reach the optimum."""
    centres = {k: float(v.mean()) for k, v in feats.items() if k != "quant"}
    return {k: (v - centres[k] if k in centres else v) for k, v in feats.items()}, centres


def _shift(x: np.ndarray, centres: dict[str, float], sign: float) -> np.ndarray:
    x = np.array(x, dtype=np.float64)
    for coef, pairs in TERM_EXPONENTS.items():
        i = PARAMS.index(coef)
        x[i] += sign * sum(x[PARAMS.index(exp)] * centres[feat] for exp, feat in pairs)
    return x


def _uncentre(x: np.ndarray, centres: dict[str, float]) -> np.ndarray:
    """Log-coefficients fitted on centred features -> the same law on the raw features (exact)."""
    return _shift(x, centres, +1.0)


def _recentre(x: np.ndarray, centres: dict[str, float]) -> np.ndarray:
    return _shift(x, centres, -1.0)


def _nnls_start(feats: dict[str, torch.Tensor], loss: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A starting point: random exponents within bounds, coefficients by NNLS on the loss."""
    exps = {k: rng.uniform(*BOUNDS[k]) for k in PARAMS if k not in LOG_PARAMS}
    exps["alpha"] = rng.uniform(0.05, 0.8)
    exps["beta"] = rng.uniform(0.05, 0.8)
    x = torch.tensor([0.0 if k in LOG_PARAMS else exps[k] for k in PARAMS], dtype=torch.float64)
    columns = torch.stack(_terms(x, feats), dim=1).numpy()  # each term with a coefficient of 1
    scale = np.maximum(columns.max(axis=0), 1e-300)
    coef, _ = nnls(columns / scale, loss)
    coef = coef / scale
    for i, name in enumerate(LOG_PARAMS):
        lo, hi = BOUNDS[name]
        x[PARAMS.index(name)] = float(np.clip(math.log(max(coef[i], 1e-12)), lo, hi))
    return x.numpy()


def _polish(x0: np.ndarray, feats: dict[str, torch.Tensor], target: torch.Tensor, max_iter: int) -> tuple[np.ndarray, float]:
    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        value = _huber(torch.log(_predict(xt, feats)) - target).sum()
        value.backward()
        return float(value.detach()), xt.grad.numpy().copy()

    res = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=[BOUNDS[k] for k in PARAMS],
                   options={"maxiter": max_iter, "maxfun": 2 * max_iter, "ftol": 1e-16, "gtol": 1e-14, "maxcor": 30})
    return res.x, float(res.fun)
