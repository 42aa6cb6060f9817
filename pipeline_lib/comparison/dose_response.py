"""Knapsack's worth in units of uniform compute, and the check that the testbed can show it.

- The primary metric of a run (`primary_value`), named in params before any run:
  `heldout_auc`, the area under held-out accuracy against training step divided by
  the steps it spans (the mean accuracy over training, so a method that learns faster
  scores higher even when all end alike), or `final_accuracy`.

- The positive control (`positive_control`): uniform at 0.5x, 1x and 2x the budget
  must differ, or no allocation can show an effect on this testbed. Paired by seed:
  d_s = metric(uniform-2x, s) - metric(uniform, s) and metric(uniform, s) -
  metric(uniform-0.5x, s), each with a 95 % t-interval over seeds. The testbed is
  sensitive only when both means are at least `SENSITIVITY` (2 points) and both
  intervals lie above 0. Computed from the uniform arms alone, before any arm is judged.

- The uniform-equivalent compute of an arm (`uniform_equivalent`): per seed, the
  budget multiplier at which that seed's uniform dose-response (the uniform arms'
  metric against log2 of their multiplier, linear between measured doses) reaches
  the arm's metric. Over seeds: the geometric mean of the multipliers with a 95 %
  t-interval on the log2 scale. A seed whose metric lies outside the measured range
  has no multiplier ("below 0.5x" / "beyond 2x"); then the arm gets none either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
SENSITIVITY = 0.02  # the smallest dose effect that makes the testbed worth judging on
# The uniform arms and the budget multiplier each spends (the strategy registry's).
UNIFORM_DOSES = {"uniform-0.5x": 0.5, "uniform": 1.0, "uniform-2x": 2.0, "uniform-4x": 4.0}
PRIMARY_METRICS = ("heldout_auc", "final_accuracy")


def heldout_auc(curve: pd.DataFrame) -> float:
    """Area under held-out accuracy vs step (trapezoids) over the steps it spans.

    Args:
        curve: columns step, accuracy; one row per evaluation (step 0 = the start policy).
    """
    ordered = curve.sort_values("step")
    steps = ordered["step"].to_numpy(np.float64)
    accuracy = ordered["accuracy"].to_numpy(np.float64)
    if steps.size < 2 or steps[-1] == steps[0]:
        return float(accuracy.mean())
    area = float(np.sum((accuracy[1:] + accuracy[:-1]) / 2.0 * np.diff(steps)))
    return area / float(steps[-1] - steps[0])


def primary_value(record: Mapping, metric: str) -> float:
    """One run's primary metric from its record (`comparison.runs.run_record`)."""
    if metric == "heldout_auc":
        return heldout_auc(pd.DataFrame(record["curve"]))
    if metric == "final_accuracy":
        return float(record["final_accuracy"])
    raise ValueError(f"unknown primary metric {metric!r}: use one of {PRIMARY_METRICS}")


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """{mean, ci}: the t-interval over seeds (ci None with fewer than two values)."""
    x = np.asarray(values, np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return {"mean": mean, "ci": None}
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return {"mean": mean, "ci": [mean - half, mean + half]}


def paired_seed_difference(
    high: Mapping[int, float], low: Mapping[int, float], confidence: float = CONFIDENCE
) -> dict:
    """high - low paired by seed (the seeds both have): per-seed values, mean and interval."""
    seeds = sorted(set(high) & set(low))
    if not seeds:
        raise ValueError("no seed in common")
    differences = [float(high[s] - low[s]) for s in seeds]
    summary = mean_interval(differences, confidence)
    return {"seeds": seeds, "per_seed": differences, "difference": summary["mean"]} | {
        "ci": summary["ci"]
    }


def positive_control(
    primary: Mapping[str, Mapping[int, float]], threshold: float = SENSITIVITY
) -> dict | None:
    """The dose-response check on the uniform arms; None when one of them was not run.

    Args:
        primary: arm -> {seed: primary metric}.
    """
    if not {"uniform-0.5x", "uniform", "uniform-2x"} <= set(primary):
        return None
    contrasts = {
        "uniform-2x - uniform": paired_seed_difference(primary["uniform-2x"], primary["uniform"]),
        "uniform - uniform-0.5x": paired_seed_difference(
            primary["uniform"], primary["uniform-0.5x"]
        ),
    }
    sensitive = all(
        c["difference"] >= threshold and c["ci"] is not None and c["ci"][0] > 0
        for c in contrasts.values()
    )
    return {"threshold": threshold, "contrasts": contrasts, "testbed_sensitive": sensitive}


def multiplier_at(value: float, doses: Sequence[tuple[float, float]]) -> float | str:
    """The budget multiplier where a dose-response reaches `value`, linear in log2 budget.

    Args:
        doses: (multiplier, metric) of the uniform arms, any order.

    Returns:
        The multiplier (the first crossing from the smallest dose up), or "below" /
        "beyond" when `value` lies under the smallest dose's metric / over every dose's.
    """
    points = sorted(doses)
    x = [math.log2(m) for m, _ in points]
    y = [v for _, v in points]
    if value < y[0]:
        return "below"
    for i in range(len(points) - 1):
        low, high = y[i], y[i + 1]
        if min(low, high) <= value <= max(low, high):
            share = 0.0 if high == low else (value - low) / (high - low)
            return float(2.0 ** (x[i] + share * (x[i + 1] - x[i])))
    return "beyond"


def uniform_equivalent(
    arm: Mapping[int, float],
    uniform: Mapping[str, Mapping[int, float]],
    confidence: float = CONFIDENCE,
) -> dict | None:
    """An arm's uniform-equivalent compute over seeds; None without two uniform doses.

    Args:
        arm: {seed: primary metric} of the arm.
        uniform: uniform arm name -> {seed: primary metric} (names of `UNIFORM_DOSES`).
    """
    measured = {UNIFORM_DOSES[name]: values for name, values in uniform.items()}
    if len(measured) < 2:
        return None
    per_seed: dict[int, float | str] = {}
    for seed, value in sorted(arm.items()):
        doses = [(m, values[seed]) for m, values in measured.items() if seed in values]
        if len(doses) >= 2:
            per_seed[seed] = multiplier_at(value, doses)
    outside = sorted({v for v in per_seed.values() if isinstance(v, str)})
    low, high = min(measured), max(measured)
    result = {
        "doses": sorted(measured),
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "multiplier": None,
        "ci": None,
        "outside": None,
    }
    if not per_seed:
        return result
    if outside:
        labels = {"below": f"below {low:g}x", "beyond": f"beyond {high:g}x"}
        result["outside"] = " / ".join(labels[o] for o in outside)
        return result
    logs = mean_interval([math.log2(v) for v in per_seed.values()], confidence)
    result["multiplier"] = float(2.0 ** logs["mean"])
    result["ci"] = None if logs["ci"] is None else [float(2.0**c) for c in logs["ci"]]
    return result
