"""PNG plots for the CLI (matplotlib is the optional extra ``plot``)."""

from __future__ import annotations

import numpy as np

from .planner import FITTED_RANGE, PAPER_A, Plan, QATScalingLaw, optimal_qat_fraction


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'hf_qat[plot]'") from None
    return plt


def plot_plan(plan: Plan, path: str, law: QATScalingLaw | None = None) -> str:
    """With a law: predicted loss against the QAT fraction, the plan and the baselines marked.
    Without: the paper's optimal fraction against tokens per parameter byte, the plan marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if law is not None:
        f_max = 1.0 - plan.pretrained_tokens / plan.d_total
        fractions = np.linspace(0.0, f_max, 200)
        losses = law.loss_curve(plan.num_params, plan.d_total, plan.bits, fractions)
        ax.plot(fractions, losses, color="C0", label="predicted loss")
        ax.scatter([plan.qat_fraction], [plan.predicted_loss], color="C3", zorder=3, label=f"plan ({plan.strategy})")
        for i, (name, row) in enumerate(plan.baselines.items()):
            if "predicted_loss" in row:
                f = row["qat_tokens"] / plan.d_total
                ax.scatter([f], [row["predicted_loss"]], marker="x", color=f"C{i + 4}", zorder=3, label=name)
        low = float(losses.min())
        ax.set_ylim(low - 0.002 * abs(low), low + 1.5 * (float(np.percentile(losses, 85)) - low) + 1e-6)
        ax.set_xlabel("QAT fraction of all training tokens")
        ax.set_ylabel("predicted final loss")
    else:
        s = np.logspace(0.3, 6, 300)
        ax.semilogx(s, [optimal_qat_fraction(v, PAPER_A) for v in s], color="C0", label="f_hat = exp(-a / ln S)")
        ax.axvspan(*FITTED_RANGE, color="C0", alpha=0.08, label="fitted range")
        ax.scatter([plan.tokens_per_param_byte], [plan.qat_fraction], color="C3", zorder=3, label="this plan")
        ax.set_xlabel("tokens per parameter byte S")
        ax.set_ylabel("optimal QAT fraction")
    ax.set_title(f"{plan.num_params:.3g} params, {plan.d_total:.3g} tokens, {plan.bits} bits")
    return _finish(plt, fig, ax, path)


def plot_fit(law: QATScalingLaw, runs, path: str) -> str:
    """Predicted against observed loss for the fitted runs (FP-only runs in grey)."""
    plt = _pyplot()
    predicted = law.predict_runs(runs)
    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=120)
    fp = np.isnan(runs.bits)
    ax.scatter(runs.loss[fp], predicted[fp], s=10, color="0.5", label="FP-only")
    for bits in sorted(set(runs.bits[~fp].tolist())):
        sel = runs.bits == bits
        ax.scatter(runs.loss[sel], predicted[sel], s=10, label=f"{bits:.3g} bits")
    lo, hi = float(min(runs.loss.min(), predicted.min())), float(max(runs.loss.max(), predicted.max()))
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
    ax.set_xlabel("observed loss")
    ax.set_ylabel("predicted loss")
    ax.set_title(f"law fit: mean |rel. error| {law.diagnostics.get('mean_abs_relative_error', float('nan')):.2%}")
    return _finish(plt, fig, ax, path)


def _finish(plt, fig, ax, path: str) -> str:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
