"""Figures of a comparison: held-out accuracy against cumulative compute, EGR per step.

One line per arm: the mean over seeds at each evaluation step, drawn at the seeds'
mean compute for that step (seeds of one arm spend about the same; dynamic sampling
varies a little), with a band from the lowest to the highest seed.
Built on `matplotlib.figure.Figure` (no pyplot), like `pipeline_lib.training.plots`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

X_LABELS = {
    "rollouts": "cumulative rollouts generated",
    "tokens": "cumulative completion tokens generated",
    "seconds": "cumulative seconds (rollout + update + weight sync)",
    "step": "training step",
}


def _arm_lines(
    ax, table: pd.DataFrame, x: str, y: str, arms: Sequence[str], colours: Mapping[str, str]
) -> None:
    """Per arm: the seed mean of `y` against the seed mean of `x` per step, min-max band;
    an arm's colour from `colours`, else matplotlib's cycle."""
    for index, arm in enumerate(arms):
        rows = table[table["arm"] == arm]
        if rows.empty:
            continue
        grouped = rows.groupby("step")
        stats = grouped[y].agg(["mean", "min", "max"]).join(grouped[x].mean().rename("x"))
        stats = stats.sort_values("x")
        colour = colours.get(arm, f"C{index % 10}")
        seeds = rows["seed"].nunique()
        ax.plot(stats["x"], stats["mean"], color=colour, label=f"{arm} ({seeds} seeds)")
        if seeds > 1:
            ax.fill_between(stats["x"], stats["min"], stats["max"], color=colour, alpha=0.2)


def accuracy_vs_compute(
    curves: pd.DataFrame, x: str, arms: Sequence[str], colours: Mapping[str, str] | None = None
) -> Figure:
    """Held-out accuracy against cumulative `x` (rollouts, tokens or seconds), per arm.

    Args:
        curves: columns arm, seed, step, accuracy, rollouts, tokens, seconds
            (`comparison.curves_table`).
    """
    from matplotlib.figure import Figure

    if x not in X_LABELS:
        raise ValueError(f"x must be one of {list(X_LABELS)}, got {x!r}")
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    _arm_lines(ax, curves, x, "accuracy", arms, colours or {})
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Held-out accuracy vs {x} (mean over seeds, min-max band)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def effective_gradient_ratio_per_step(
    egr: pd.DataFrame,
    arms: Sequence[str],
    window: int = 10,
    colours: Mapping[str, str] | None = None,
) -> Figure:
    """Effective-gradient ratio per step per arm, a `window`-step rolling mean per seed.

    Args:
        egr: columns arm, seed, step, value (`comparison.egr_table`).
    """
    from matplotlib.figure import Figure

    smoothed = egr.sort_values(["arm", "seed", "step"]).copy()
    smoothed["value"] = smoothed.groupby(["arm", "seed"])["value"].transform(
        lambda series: series.rolling(window, min_periods=1).mean()
    )
    smoothed["step_x"] = smoothed["step"]
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    _arm_lines(ax, smoothed, "step_x", "value", arms, colours or {})
    ax.set_xlabel(X_LABELS["step"])
    ax.set_ylabel(f"effective-gradient ratio ({window}-step rolling mean)")
    ax.set_title("Share of rollouts with a learning signal (mean over seeds, min-max band)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig
