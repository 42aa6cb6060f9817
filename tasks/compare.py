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

import json
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib import compare_plots
from pipeline_lib.compare_stats import compare_summary
from pipeline_lib.comparison import (
    RunInputs,
    arm_runs,
    curves_table,
    egr_table,
    run_config,
    run_key,
    run_name,
    run_record,
)
from pipeline_lib.config import PipelineConfig
from pipeline_lib.rollout.base import RolloutEngine
from pipeline_lib.tracking import PARENT_RUN_TAG, Tracker, start_run
from pipeline_lib.training import DirectoryCheckpointer
from tasks.hashing import content_hash
from tasks.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    RUN_COLOR_TAG,
    STRATEGY_COLORS,
    find_run_by_tag,
    git_commit,
    prepare_tracking_store,
)
from tasks.train import TrainingInputs, run_training

RECORD_FILE = "record.json"
ARM_TAG, SEED_TAG, RUN_KEY_TAG = "arm", "seed", "knapsack_rl.compare_run_key"
REUSED_TAG = "knapsack_rl.reused_from_run"
# What a run's result depends on besides its settings: the training code path.
TRAINING_CODE = (
    "pipeline_lib/training",
    "pipeline_lib/update",
    "pipeline_lib/rollout",
    "pipeline_lib/policy",
    "pipeline_lib/allocation.py",
    "pipeline_lib/strategies.py",
    "pipeline_lib/status.py",
    "pipeline_lib/grpo.py",
    "pipeline_lib/rewards.py",
    "pipeline_lib/scoring.py",
    "pipeline_lib/prompts.py",
    "tasks/train.py",
)
PLOTS = {
    "rollouts": "accuracy_vs_rollouts.png",
    "tokens": "accuracy_vs_tokens.png",
    "seconds": "accuracy_vs_seconds.png",
}
EGR_PLOT = "effective_gradient_ratio.png"


def code_hash(root: Path = Path(".")) -> str:
    """sha256 over the training code's Python sources (their paths and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for entry in TRAINING_CODE:
        path = root / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
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


def open_child_run(
    config: PipelineConfig,
    name: str,
    tags: Mapping[str, object],
    parent_run_id: str | None,
    resuming: bool,
) -> AbstractContextManager[Tracker]:
    """A run's MLflow child of the comparison. A resumed run continues the MLflow run of
    its interrupted attempt (found by its key tag), moved under this comparison's parent,
    so one arm x seed has one run with its whole history."""
    uri = prepare_tracking_store(config)
    previous = find_run_by_tag(config, RUN_KEY_TAG, str(tags[RUN_KEY_TAG])) if resuming else None
    if previous is not None:
        moved = {PARENT_RUN_TAG: parent_run_id} if parent_run_id else {}
        return start_run(
            uri, config.tracking.experiment, run_id=previous, tags=moved, flush_every=10
        )
    return start_run(
        uri,
        config.tracking.experiment,
        run_name=name,
        tags=tags,
        parent_run_id=parent_run_id,
        artifact_location=config.tracking.artifact_location,
        flush_every=10,
    )


@contextmanager
def comparison_run(config: PipelineConfig) -> Iterator[Tracker]:
    """The MLflow parent run of one comparison; the experiment marked as model training."""
    from mlflow import MlflowClient

    compare = config.compare
    uri = prepare_tracking_store(config)
    note = (
        f"**Comparison** of {', '.join(compare.arms)} against {compare.baseline}: seeds "
        f"{list(compare.seeds)}, {compare.steps} steps each, one start policy; "
        f"commit `{git_commit()[:12]}`. Children: one run per arm x seed."
    )
    tags = {
        "stage": "compare",
        "arms": ",".join(compare.arms),
        "seeds": ",".join(map(str, compare.seeds)),
        "git_commit": git_commit(),
        NOTE_TAG: note,
    }
    with start_run(
        uri,
        config.tracking.experiment,
        run_name=f"compare-{config.fingerprint()[:8]}",
        tags=tags,
        artifact_location=config.tracking.artifact_location,
    ) as parent:
        client = MlflowClient(tracking_uri=uri)
        experiment_id = client.get_run(str(parent.run_id)).info.experiment_id
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        parent.log_params(
            {
                "compare": compare.model_dump(mode="json"),
                "train": config.train.model_dump(mode="json"),
            }
        )
        yield parent


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


def write_comparison(
    config: PipelineConfig,
    records: Sequence[Mapping],
    metrics_path: Path,
    plots_dir: Path,
    parent: Tracker,
) -> dict:
    """metrics/compare.json, the plots (PNG) and the curves, also on the parent run."""
    arms = config.compare.arms
    summary = compare_summary(config.compare.baseline, arm_runs(records, arms))
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
