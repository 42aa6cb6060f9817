"""The evaluate stage's numbers as DVC metrics: the headline (metrics/summary.json) and
the details (metrics/eval.json), each number under one name."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline_lib.data.layout import SYNTHETIC_BENCHMARK

SUMMARY = Path("metrics/summary.json")
EVAL = Path("metrics/eval.json")

# metrics/train.json names (and the names it had before they lost their `mean_` prefix).
# Wall-clock timings are in metrics/timing.json, which this stage does not read: the
# headline stays bit-identical between runs on one machine.
TRAIN_KEYS = {"effective_gradient_ratio": "mean_effective_gradient_ratio"}
# Per policy on the main benchmark, these are the headline (summary.json), not eval.json.
HEADLINE_KEYS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high")


def main_benchmark(benchmarks: list[Path]) -> str:
    """The benchmark the headline numbers come from: the synthetic one, else the first."""
    names = [b.stem for b in benchmarks]
    return SYNTHETIC_BENCHMARK if SYNTHETIC_BENCHMARK in names else names[0]


def eval_metrics(results: dict, main: str) -> dict:
    """metrics/eval.json: the results less the numbers that have another name in DVC's
    metrics: pass@1 (the accuracy: the unbiased pass@1 estimate is the mean success over
    the k samples) and, on the main benchmark, the accuracy and its interval (the headline
    in summary.json)."""

    def kept(bench: str, key: str) -> bool:
        return key != "pass@1" and not (bench == main and key in HEADLINE_KEYS)

    return {
        policy: {
            bench: {k: v for k, v in metrics.items() if kept(bench, k)}
            for bench, metrics in per_bench.items()
        }
        for policy, per_bench in results.items()
    }


def mlflow_name(key: str) -> str:
    """MLflow metric names allow no '@': pass@4 -> pass_at_4."""
    return key.replace("@", "_at_")


def summarize(
    results: dict, benchmarks: list[Path], strategies: tuple[str, ...]
) -> dict[str, float]:
    """The headline numbers (all floats): accuracy with its 95 % interval on the main
    benchmark per policy (start and each strategy), each strategy's training facts from
    metrics/train.json, and knapsack's effective-gradient ratio over uniform's."""
    main = main_benchmark(benchmarks)
    summary = {
        f"{policy}_{key}": results[policy][main][key]
        for policy in ("start", *strategies)
        for key in HEADLINE_KEYS
    }
    train_summary_path = Path("metrics/train.json")
    train_summary = (
        json.loads(train_summary_path.read_text()) if train_summary_path.exists() else {}
    )
    for strategy in strategies:
        trained = train_summary.get(strategy, {})
        for name, legacy in TRAIN_KEYS.items():
            value = trained.get(name, trained.get(legacy))
            if value is not None:
                summary[f"{strategy}_{name}"] = value
    ratios = [summary.get(f"{s}_effective_gradient_ratio") for s in ("knapsack", "uniform")]
    if None not in ratios and ratios[1] > 0:
        summary["effective_gradient_ratio_gain"] = ratios[0] / ratios[1]
    return summary
