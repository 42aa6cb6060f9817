"""Stage `evaluate`: the starting and trained policies on every held-out benchmark."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from flows.common import load_stage_config, run_flow_cli
from tasks.engines import open_engine
from tasks.evaluate import evaluate_policy
from tasks.hashing import content_hash
from tasks.prepare import SYNTHETIC_BENCHMARK, TRAIN_FILE
from tasks.tracking import stage_run

SUMMARY = Path("metrics/summary.json")


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
                    {mlflow_name(f"eval/{name}/{bench.stem}/{k}"): v for k, v in metrics.items()}
                )
                print(f"{name} on {bench.stem}: accuracy {metrics['accuracy']:.3f}")
        summary = summarize(results, benchmarks, config.train.strategies)
        SUMMARY.parent.mkdir(exist_ok=True)
        SUMMARY.write_text(json.dumps(summary, indent=2, sort_keys=True))
        Path("metrics/eval.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        tracker.log_artifact(str(SUMMARY), "metrics")
        tracker.log_metrics(
            {f"summary/{k}": v for k, v in summary.items() if isinstance(v, int | float)}
        )
    return summary


def mlflow_name(key: str) -> str:
    """MLflow metric names allow no '@': pass@4 -> pass_at_4."""
    return key.replace("@", "_at_")


def summarize(
    results: dict, benchmarks: list[Path], strategies: tuple[str, ...]
) -> dict[str, float]:
    """The headline numbers: accuracy on the main benchmark per policy, training ratios, speed."""
    names = [b.stem for b in benchmarks]
    main = SYNTHETIC_BENCHMARK if SYNTHETIC_BENCHMARK in names else names[0]
    summary = {"benchmark": main, "start_accuracy": results["start"][main]["accuracy"]}
    train_summary_path = Path("metrics/train.json")
    train_summary = (
        json.loads(train_summary_path.read_text()) if train_summary_path.exists() else {}
    )
    for strategy in strategies:
        summary[f"{strategy}_accuracy"] = results[strategy][main]["accuracy"]
        summary[f"{strategy}_accuracy_ci_low"] = results[strategy][main]["accuracy_ci_low"]
        summary[f"{strategy}_accuracy_ci_high"] = results[strategy][main]["accuracy_ci_high"]
        trained = train_summary.get(strategy, {})
        for key in (
            "mean_effective_gradient_ratio",
            "rollout_tokens_per_second",
            "mean_step_seconds",
        ):
            if key in trained:
                short = key.removeprefix("mean_")
                summary[f"{strategy}_{short}"] = trained[key]
    return summary


if __name__ == "__main__":
    run_flow_cli(evaluate, section="evaluate")
