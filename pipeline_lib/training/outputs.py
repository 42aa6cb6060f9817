"""The train stage's outputs besides the policies: metrics/train.json, metrics/timing.json
and the curves (one wide CSV per curve) that `dvc plots` draws."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

# train_strategy's summary key -> metrics/train.json name. Numbers only (no paths), and
# not the in-training held-out accuracy: the evaluate stage's accuracy is the one result
# (metrics/summary.json); the curve of the in-training one is metrics/curves/accuracy.csv.
TRAIN_METRICS = {"mean_effective_gradient_ratio": "effective_gradient_ratio"}
# Wall-clock numbers differ on every run, so they get a file of their own: every other
# output of a run is bit-identical on the same machine (docs/operations.md, Reproducibility).
TIMING = Path("metrics/timing.json")
TIMING_METRICS = {
    "rollout_tokens_per_second": "rollout_tokens_per_second",
    "mean_step_seconds": "step_seconds",
}


def train_metrics(summaries: dict[str, dict]) -> dict[str, dict[str, float]]:
    """metrics/train.json: per strategy, the training facts DVC compares between runs."""
    return {
        strategy: {name: float(summary[key]) for key, name in TRAIN_METRICS.items()}
        for strategy, summary in summaries.items()
    }


def timing_metrics(summaries: dict[str, dict]) -> dict[str, float]:
    """metrics/timing.json: `<strategy>_step_seconds` and `_rollout_tokens_per_second`."""
    return {
        f"{strategy}_{name}": float(summary[key])
        for strategy, summary in summaries.items()
        for key, name in TIMING_METRICS.items()
    }


CURVES = {
    "accuracy": "eval/accuracy",
    "effective_gradient_ratio": "rollout/effective_gradient_ratio",
}
CURVES_PNG = "plots/training_curves.png"


def strategy_steps(steps_csvs: dict[str, Path]) -> pd.DataFrame:
    """Every strategy's per-step metrics in one long table with a `strategy` column."""
    return pd.concat(
        [pd.read_csv(path).assign(strategy=strategy) for strategy, path in steps_csvs.items()],
        ignore_index=True,
    )


def write_curves(steps_csvs: dict[str, Path], out_dir: Path = Path("metrics/curves")) -> None:
    """One wide CSV per curve (step, one column per strategy) for `dvc plots`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {strategy: pd.read_csv(path) for strategy, path in steps_csvs.items()}
    for name, column in CURVES.items():
        wide = None
        for strategy, steps in tables.items():
            series = steps[["step", column]].dropna().rename(columns={column: strategy})
            wide = series if wide is None else wide.merge(series, on="step", how="outer")
        wide.sort_values("step").to_csv(out_dir / f"{name}.csv", index=False)
