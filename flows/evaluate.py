"""Stage `evaluate`: the starting and trained policies on every held-out benchmark.

DVC's metrics hold each number under one name: `metrics/summary.json` the headline
(accuracy with its interval per policy on the main benchmark, the training facts from
`metrics/train.json`), `metrics/eval.json` the rest (per-level accuracy, pass@k, other
benchmarks). Besides these files, it writes the answer into MLflow:
the pipeline's parent run gets the headline numbers, `summary.json` and a description
with the results table and links to the stage runs; each strategy's training run gets
its train config and its held-out results, so MLflow's Compare shows them side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from flows.common import load_stage_config, run_flow_cli
from pipeline_lib.config import PipelineConfig
from pipeline_lib.results import markdown_table
from tasks.engines import open_engine
from tasks.evaluate import evaluate_policy
from tasks.hashing import content_hash
from tasks.prepare import SYNTHETIC_BENCHMARK, TRAIN_FILE
from tasks.tracking import (
    NOTE_TAG,
    append_to_run,
    pipeline_description,
    pipeline_parent,
    stage_links,
    stage_run,
    strategy_runs,
)

SUMMARY = Path("metrics/summary.json")
EVAL = Path("metrics/eval.json")
# metrics/train.json names (and the names it had before they lost their `mean_` prefix).
# Wall-clock timings are in metrics/timing.json, which this stage does not read: the
# headline stays bit-identical between runs on one machine.
TRAIN_KEYS = {"effective_gradient_ratio": "mean_effective_gradient_ratio"}
# Per policy on the main benchmark, these are the headline (summary.json), not eval.json.
HEADLINE_KEYS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high")


@flow(name="evaluate", log_prints=True)
def evaluate(params_path: str = "params.yaml", overrides: dict | None = None) -> dict:
    """Score each policy (start + one per strategy) on each benchmark; write the summary."""
    config = load_stage_config(params_path, overrides)
    prepared = Path(config.prepare.output_dir)
    benchmarks = sorted(p for p in prepared.glob("*.parquet") if p.name != TRAIN_FILE)
    policies = {"start": config.bootstrap.output_dir} | {
        s: str(Path(config.train.output_dir) / s) for s in config.train.strategies
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    with (
        stage_run(config, "evaluate") as tracker,
        open_engine(
            config.train.backend,
            config.bootstrap.output_dir,
            config.seed,
            config.train.vllm_engine_kwargs,
        ) as engine,
    ):
        for name, policy_dir in policies.items():
            policy_hash = content_hash(policy_dir)
            for bench in benchmarks:
                metrics = evaluate_policy(
                    config, policy_dir, policy_hash, str(bench), content_hash(bench), engine
                )
                results.setdefault(name, {})[bench.stem] = metrics
                tracker.log_metrics(
                    {mlflow_name(f"heldout/{name}/{bench.stem}/{k}"): v for k, v in metrics.items()}
                )
                print(f"{name} on {bench.stem}: accuracy {metrics['accuracy']:.3f}")
        summary = summarize(results, benchmarks, config.train.strategies)
        SUMMARY.parent.mkdir(exist_ok=True)
        SUMMARY.write_text(json.dumps(summary, indent=2, sort_keys=True))
        main = main_benchmark(benchmarks)
        EVAL.write_text(json.dumps(eval_metrics(results, main), indent=2, sort_keys=True))
        tracker.log_artifact(str(SUMMARY), "metrics")
        tracker.log_artifact(str(EVAL), "metrics")
        tracker.set_tags({"benchmark": main})
        log_pipeline_result(config, summary, results, main)
    return summary


def log_pipeline_result(
    config: PipelineConfig, summary: dict[str, float], results: dict, benchmark: str
) -> None:
    """The answer into MLflow: the parent run (headline, summary.json, description with the
    table and stage links) and each strategy's training run (config, held-out results)."""
    parent = pipeline_parent(config)
    if parent is None:
        return
    strategies = config.train.strategies
    for strategy, run_id in strategy_runs(config, parent).items():
        if strategy not in results:
            continue
        run = append_to_run(config, run_id)
        run.log_params({"train": config.train.model_dump(mode="json"), "seed": config.seed})
        run.log_metrics(
            {
                mlflow_name(f"heldout/{bench}/{key}"): value
                for bench, metrics in results[strategy].items()
                for key, value in metrics.items()
            }
        )
        run.set_tags({"benchmark": benchmark})
    run = append_to_run(config, parent)
    run.log_metrics(summary)
    run.log_artifact(str(SUMMARY), "metrics")
    table = f"Held-out results on `{benchmark}`:\n\n" + markdown_table(summary, strategies)
    results_text = table + "\n\n" + stage_links(config, parent)
    run.set_tags({NOTE_TAG: pipeline_description(config, results_text), "benchmark": benchmark})


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


if __name__ == "__main__":
    run_flow_cli(evaluate, section="evaluate")
