"""Prefect tasks of stage `compare`: one arm x seed training run, its cached record, the outputs.

Caching: each finished run writes `<compare.output_dir>/runs/<arm>-seed<s>-<key>/
record.json`, where the key hashes everything the run's result depends on
(`pipeline_lib.comparison.run_key`: its settings, seed, start policy, data and the
training code). A later comparison needing that run reads the record instead of
training: adding a seed trains only that seed's runs. DVC keeps the folder as a
persistent output of the stage (not deleted when the stage reruns).

MLflow: one parent run per comparison, one child per arm x seed tagged `arm` and
`seed`; a reused run gets a child too, tagged with the run that trained it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.adapters.mlflow_runs import (
    ARM_TAG,
    REUSED_TAG,
    RUN_COLOR_TAG,
    RUN_KEY_TAG,
    SEED_TAG,
    STRATEGY_COLORS,
    open_child_run,
)
from pipeline_lib.comparison import plots as compare_plots
from pipeline_lib.comparison.runs import (
    RunInputs,
    arm_runs,
    curves_table,
    egr_table,
    run_config,
    run_key,
    run_name,
    run_record,
)
from pipeline_lib.comparison.stats import compare_summary
from pipeline_lib.config import PipelineConfig
from pipeline_lib.data.layout import heldout_table
from pipeline_lib.import_graph import module_closure_files
from pipeline_lib.rollout.base import RolloutEngine
from pipeline_lib.tracking import Tracker
from pipeline_lib.training import DirectoryCheckpointer
from tasks.engines import open_engine
from tasks.hashing import content_hash
from tasks.train import TrainingInputs, run_training

RECORD_FILE = "record.json"
# What a run's result depends on besides its settings: the code it runs, i.e. the training
# task, the rollout engines it is handed, and every repository module they import.
TRAINING_CODE_ROOTS = ("tasks.train", "tasks.engines")
PLOTS = {
    "rollouts": "accuracy_vs_rollouts.png",
    "tokens": "accuracy_vs_tokens.png",
    "seconds": "accuracy_vs_seconds.png",
}
EGR_PLOT = "effective_gradient_ratio.png"


def code_hash(root: Path = Path(".")) -> str:
    """sha256 over the sources (paths and bytes) of the training task, the engines and every
    repository module they import, directly or not: any change there makes new run keys."""
    digest = hashlib.sha256()
    root = root.resolve()
    for file in module_closure_files(TRAINING_CODE_ROOTS, root):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:20]


def run_inputs(config: PipelineConfig, train_path: Path, heldout_path: Path) -> RunInputs:
    """The comparison's shared inputs (start policy, data, code) with their hashes."""
    start = config.bootstrap.output_dir
    return RunInputs(
        start_policy=start,
        start_hash=content_hash(start),
        train_path=str(train_path),
        heldout_path=str(heldout_path),
        data_hash=content_hash(train_path) + content_hash(heldout_path),
        code_hash=code_hash(),
    )


def run_dir(config: PipelineConfig, arm: str, seed: int, inputs: RunInputs) -> Path:
    """The folder of one arm x seed run (named by its key)."""
    key = run_key(config, arm, seed, inputs)
    return Path(config.compare.output_dir) / "runs" / run_name(arm, seed, key)


def cached_record(config: PipelineConfig, arm: str, seed: int, inputs: RunInputs) -> dict | None:
    """The record of this exact run if it finished before, else None."""
    path = run_dir(config, arm, seed, inputs) / RECORD_FILE
    return json.loads(path.read_text()) if path.exists() else None


def save_record(config: PipelineConfig, record: Mapping, inputs: RunInputs) -> Path:
    """Write a run's record into its folder (atomically: a half-written record is no cache)."""
    path = run_dir(config, record["arm"], record["seed"], inputs) / RECORD_FILE
    if record["key"] != path.parent.name.rsplit("-", 1)[-1]:
        raise ValueError(
            f"run {record['arm']} seed {record['seed']} was trained with key {record['key']}, "
            f"this comparison expects {path.parent.name}: different code, start policy or data"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    temporary.replace(path)
    return path


@task(cache_policy=NO_CACHE, task_run_name="train-{arm}-seed{seed}")
def train_arm_seed(
    config: PipelineConfig,
    arm: str,
    seed: int,
    inputs: RunInputs,
    engine: RolloutEngine,
    parent_run_id: str | None,
) -> dict:
    """Train one arm x seed run (the train stage's code path) and return its record.

    Its MLflow run is a child of the comparison's parent run, tagged `arm` and `seed`.
    An interrupted run resumes from its checkpoint (outputs/compare_state/<run>).
    """
    settings = run_config(config, arm, seed)
    directory = run_dir(config, arm, seed, inputs)
    key = directory.name.rsplit("-", 1)[-1]
    state_dir = Path("outputs/compare_state") / directory.name
    tags = {ARM_TAG: arm, SEED_TAG: seed, "strategy": arm, "stage": "compare", RUN_KEY_TAG: key}
    if arm in STRATEGY_COLORS:  # the arm's colour in MLflow's charts, as in the PNG plots
        tags[RUN_COLOR_TAG] = STRATEGY_COLORS[arm]
    started = time.perf_counter()
    outcome = run_training(
        settings,
        arm,
        TrainingInputs(inputs.start_policy, inputs.train_path, inputs.heldout_path),
        engine,
        DirectoryCheckpointer(state_dir, fingerprint=key),
        lambda resuming: open_child_run(
            config, f"compare/{arm}/seed{seed}", tags, parent_run_id, resuming
        ),
        directory,
        save_policy_dir=False,
    )
    record = run_record(
        arm,
        seed,
        key,
        outcome.result.steps,
        outcome.prompt_scores,
        time.perf_counter() - started,
        outcome.run_id,
    )
    save_record(config, record, inputs)
    shutil.rmtree(state_dir, ignore_errors=True)  # finished: the record replaces it
    return record


def log_reused_run(parent: Tracker, record: Mapping) -> None:
    """A child run for a run this comparison reused: its tags, final numbers, origin."""
    tags = {
        ARM_TAG: record["arm"],
        SEED_TAG: record["seed"],
        "strategy": record["arm"],
        "stage": "compare",
        RUN_KEY_TAG: record["key"],
        REUSED_TAG: record.get("mlflow_run_id") or "unknown",
    }
    with parent.child(f"compare/{record['arm']}/seed{record['seed']} (reused)", tags) as child:
        child.log_metrics(record_metrics(record))


def record_metrics(record: Mapping) -> dict[str, float]:
    """A run's final numbers as `summary/` metrics."""
    metrics = {
        "summary/final_accuracy": record["final_accuracy"],
        "summary/effective_gradient_ratio": record["effective_gradient_ratio"],
        "summary/train_seconds": record["train_seconds"],
    }
    return metrics | {f"summary/{k}": v for k, v in record["compute_totals"].items()}


def heldout_levels(config: PipelineConfig, num_prompts: int):
    """int[num_prompts]: the levels of the held-out prompts the runs scored (the first
    train.eval_prompts of the held-out table); None when the table has no level column
    (real benchmarks)."""
    table = pd.read_parquet(heldout_table(Path(config.prepare.output_dir)))
    if "level" not in table.columns:
        return None
    return table["level"].to_numpy()[:num_prompts]


def write_comparison(
    config: PipelineConfig,
    records: Sequence[Mapping],
    metrics_path: Path,
    plots_dir: Path,
    parent: Tracker,
) -> dict:
    """metrics/compare.json, the plots (PNG) and the curves, also on the parent run."""
    arms = config.compare.selected_arms
    metric = config.compare.primary_metric
    levels = heldout_levels(config, len(records[0]["prompt_scores"])) if records else None
    summary = compare_summary(
        config.compare.baseline, arm_runs(records, arms, metric), metric, levels
    )
    summary["steps"] = config.compare.steps
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
    plots_dir.mkdir(parents=True, exist_ok=True)
    curves = curves_table(records)
    figures = {
        name: compare_plots.accuracy_vs_compute(curves, x, arms, STRATEGY_COLORS)
        for x, name in PLOTS.items()
    }
    figures[EGR_PLOT] = compare_plots.effective_gradient_ratio_per_step(
        egr_table(records), arms, colours=STRATEGY_COLORS
    )
    for name, figure in figures.items():
        figure.savefig(plots_dir / name, dpi=110)
        parent.log_artifact(plots_dir / name, "plots")
    parent.log_artifact(metrics_path, "metrics")
    parent.log_metrics(
        {f"{arm}/accuracy_mean": entry["accuracy_mean"] for arm, entry in summary["arms"].items()}
    )
    return summary


@task(cache_policy=NO_CACHE, task_run_name="process-{arm}-seed{seed}")
def train_with_own_engine(
    config: PipelineConfig, arm: str, seed: int, inputs: RunInputs, parent_id: str
) -> dict:
    """One arm x seed in a worker process of the task runner, with an engine of its own
    (opened as the shared one is: same checkpoint, same engine seed)."""
    train = config.train
    with open_engine(
        train.backend, inputs.start_policy, config.seed, train.vllm_engine_kwargs
    ) as engine:
        return train_arm_seed.fn(config, arm, seed, inputs, engine, parent_id)


@task(cache_policy=NO_CACHE, task_run_name="deployment-{arm}-seed{seed}")
def deployed_run(
    deployment: str, arm: str, seed: int, parameters: dict[str, Any], parent_id: str
) -> dict:
    """One arm x seed as a flow run of `deployment`; its record is the run's result."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        deployment,
        parameters=parameters | {"arm": arm, "seed": seed, "parent_run_id": parent_id},
        flow_run_name=f"compare-{arm}-seed{seed}",
        timeout=None,
    )
    if flow_run.state is None or not flow_run.state.is_completed():
        raise RuntimeError(f"flow run {flow_run.name} of {deployment} ended {flow_run.state}")
    return flow_run.state.result()
