"""Figures for runs: rollout allocation, calibration of predicted success rates, training curves.

Built on `matplotlib.figure.Figure`, not pyplot: no global figure registry and no backend
switch, so a figure is freed with its last reference and `savefig` renders with Agg.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def allocation_histogram(
    rollouts_per_prompt: np.ndarray, title: str = "Rollouts per prompt", max_bars: int = 64
) -> Figure:
    """Histogram of N_i, shape [M], with the uniform allocation N_avg = sum(N_i) / M marked.

    One bar per integer N while the range fits in `max_bars`, else bars a few integers wide.
    """
    from matplotlib.figure import Figure

    n = np.asarray(rollouts_per_prompt)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"rollouts_per_prompt must be a non-empty 1-D array, got shape {n.shape}")
    low, high = int(n.min()), int(n.max())
    width = max(1, math.ceil((high - low + 1) / max_bars))
    edges = np.arange(low, high + width + 1, width) - 0.5

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ax.hist(n, bins=edges, color="C0", edgecolor="white", label="prompts")
    ax.axvline(n.mean(), color="k", linestyle="--", label=f"uniform N_avg = {n.mean():.1f}")
    ax.set_title(title)
    ax.set_xlabel("rollouts per prompt N_i")
    ax.set_ylabel("prompts")
    ax.legend(title=f"{n.size} prompts, {int(n.sum())} rollouts, max N = {high}")
    return fig


def calibration_plot(
    predicted_p: np.ndarray,
    realised_success: np.ndarray,
    bins: int = 10,
    title: str = "Success-rate calibration",
) -> Figure:
    """Reliability diagram: mean predicted p vs mean realised success per equal-width bin.

    Args:
        predicted_p: shape [M], the success rate the allocator used (NaN = no estimate;
            such prompts are left out).
        realised_success: shape [M], what the rollouts then achieved (a rate or 0/1).
        bins: number of equal-width bins on [0, 1].

    Top panel: one point per non-empty bin, the diagonal, the expected calibration
    error (ECE, count-weighted mean gap) in the legend. Bottom panel: prompts per bin.
    """
    from matplotlib.figure import Figure

    predicted = np.asarray(predicted_p, dtype=float)
    realised = np.asarray(realised_success, dtype=float)
    if predicted.shape != realised.shape or predicted.ndim != 1:
        raise ValueError(
            f"need two 1-D arrays of one shape, got {predicted.shape} and {realised.shape}"
        )
    known = np.isfinite(predicted) & np.isfinite(realised)
    predicted, realised = predicted[known], realised[known]
    if np.any((predicted < 0) | (predicted > 1)):
        raise ValueError("predicted_p must lie in [0, 1]")

    bin_index = np.clip((predicted * bins).astype(int), 0, bins - 1)
    counts = np.bincount(bin_index, minlength=bins)
    filled = counts > 0
    safe_counts = np.maximum(counts, 1)
    mean_predicted = np.bincount(bin_index, weights=predicted, minlength=bins) / safe_counts
    mean_realised = np.bincount(bin_index, weights=realised, minlength=bins) / safe_counts
    gap = np.abs(mean_predicted - mean_realised)
    ece = float(np.sum(counts * gap) / counts.sum()) if counts.sum() else math.nan

    fig = Figure(figsize=(5, 6), layout="constrained")
    ax, ax_counts = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    ax.plot(
        mean_predicted[filled],
        mean_realised[filled],
        marker="o",
        color="C0",
        label=f"per bin (ECE {ece:.3f})",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("realised success rate")
    ax.set_title(title)
    ax.legend(loc="upper left")
    centres = (np.arange(bins) + 0.5) / bins
    ax_counts.bar(centres, counts, width=1 / bins, color="C0", edgecolor="white")
    ax_counts.set_xlabel("predicted success rate p")
    ax_counts.set_ylabel("prompts")
    return fig


def training_curves(
    steps_table: pd.DataFrame,
    metrics: Sequence[str] = ("accuracy", "effective_gradient_ratio"),
    x: str = "step",
    by: str = "strategy",
) -> Figure:
    """One panel per metric, one line per strategy (e.g. knapsack vs uniform) against `x`.

    `steps_table` has one row per (strategy, step[, seed]). Several rows for one
    (strategy, x), e.g. seeds, are drawn as their mean with a min-max band. Missing
    values (a metric logged every k steps) are skipped, so lines stay connected.
    Pass `x="wall_s"` to compare at equal wall time instead of equal steps.
    """
    from matplotlib.figure import Figure

    missing = [c for c in (x, by, *metrics) if c not in steps_table.columns]
    if missing:
        raise ValueError(f"steps_table lacks columns {missing}")
    strategies = sorted(steps_table[by].unique())

    fig = Figure(figsize=(4.5 * len(metrics), 3.8), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        banded = False
        for colour_index, strategy in enumerate(strategies):
            rows = steps_table.loc[steps_table[by] == strategy, [x, metric]].dropna()
            if rows.empty:
                continue
            stats = rows.groupby(x)[metric].agg(["mean", "min", "max", "count"])
            colour = f"C{colour_index % 10}"
            ax.plot(stats.index, stats["mean"], color=colour, label=str(strategy))
            if (stats["count"] > 1).any():
                ax.fill_between(stats.index, stats["min"], stats["max"], color=colour, alpha=0.2)
                banded = True
        ax.set_title(metric)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(title=f"{by} (mean, min-max band)" if banded else by)
    return fig
