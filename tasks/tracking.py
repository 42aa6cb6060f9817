"""MLflow runs for stages: one parent run per pipeline run, a nested run per stage.

Stages run in separate processes (each DVC stage is its own command), so the
parent is found by a tag: the pipeline key (config fingerprint + git commit), or
given outright through KNAPSACK_RL_PARENT_RUN_ID by a flow that runs all stages.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline_lib.config import PipelineConfig
from pipeline_lib.tracking import Tracker, start_run

PARENT_ENV = "KNAPSACK_RL_PARENT_RUN_ID"
PIPELINE_KEY_TAG = "knapsack_rl.pipeline_key"


# Metrics are written every this many steps: one sqlite write costs ~15-30 ms whatever
# its size. Failures and Ctrl-C still write everything; only a hard kill loses a few.
FLUSH_EVERY = 10


def prepare_tracking_store(config: PipelineConfig) -> str:
    """The tracking URI (MLFLOW_TRACKING_URI when set, else params.yaml's tracking.uri),
    with a local sqlite store made ready: its folder created and WAL journaling on.

    WAL persists in the file: writes get cheaper and stages can write while the UI reads.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config.tracking.uri
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
    return uri


def git_commit() -> str:
    """The repository's HEAD commit, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_key(config: PipelineConfig) -> str:
    return f"{config.fingerprint()}-{git_commit()[:12]}"


def find_or_create_parent(config: PipelineConfig) -> str:
    """The parent run of this configuration at this commit, created on first use."""
    from mlflow import MlflowClient

    uri, key = prepare_tracking_store(config), pipeline_key(config)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
    tags = {PIPELINE_KEY_TAG: key, "git_commit": git_commit()}
    with start_run(
        uri,
        config.tracking.experiment,
        run_name=f"pipeline-{key[:8]}",
        tags=tags,
        artifact_location=config.tracking.artifact_location,
    ) as parent:
        parent.log_params(config.model_dump(mode="json"))
        return str(parent.run_id)


@contextmanager
def stage_run(config: PipelineConfig, stage: str) -> Iterator[Tracker]:
    """A nested MLflow run for one stage under the pipeline's parent run."""
    parent = os.environ.get(PARENT_ENV) or find_or_create_parent(config)
    with start_run(
        prepare_tracking_store(config),
        config.tracking.experiment,
        run_name=stage,
        tags={"stage": stage, "git_commit": git_commit()},
        parent_run_id=parent,
        artifact_location=config.tracking.artifact_location,
        flush_every=FLUSH_EVERY,
    ) as tracker:
        tracker.log_params(
            {stage: getattr(config, stage).model_dump(mode="json"), "seed": config.seed}
        )
        yield tracker
        for name in ("params.yaml", "dvc.lock"):
            if Path(name).exists():
                tracker.log_artifact(name, "pipeline")


def find_run_by_tag(config: PipelineConfig, tag: str, value: str) -> str | None:
    """The newest run of the experiment with `tag` = `value`, if any."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=prepare_tracking_store(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{tag}` = '{value}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None
