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
from pipeline_lib.data.layout import benchmark_tables
from pipeline_lib.evaluation.summary import (
    EVAL,
    SUMMARY,
    eval_metrics,
    main_benchmark,
    mlflow_name,
    summarize,
)
from tasks.engines import open_engine
from tasks.evaluate import evaluate_policy, log_pipeline_result
from tasks.hashing import content_hash
from tasks.tracking import stage_run


@flow(name="evaluate", log_prints=True)
def evaluate(params_path: str = "params.yaml", overrides: dict | None = None) -> dict:
    """Score each policy (start + one per strategy) on each benchmark; write the summary."""
    config = load_stage_config(params_path, overrides)
    prepared = Path(config.prepare.output_dir)
    benchmarks = benchmark_tables(prepared)
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


if __name__ == "__main__":
    run_flow_cli(evaluate, section="evaluate")
