"""MLflow runs of a stage inside its Prefect flow run.

`stage_run` opens a stage's nested MLflow run under the pipeline's parent run (the
adapter `pipeline_lib.adapters.mlflow_runs` does the MLflow work), names the Prefect
flow run after the stage, tags it (pipeline run, stage, seed) and links it to its
MLflow run; the tracker it yields writes a progress line to the Prefect run log every
`PROGRESS_EVERY` logged steps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline_lib.adapters.mlflow_runs import (
    FLUSH_EVERY,
    PARENT_ENV,
    PROGRESS_EVERY,
    ProgressTracker,
    find_or_create_parent,
    git_commit,
    mlflow_ui_url,
    prepare_tracking_store,
)
from pipeline_lib.adapters.mlflow_tracker import start_run
from pipeline_lib.config import PipelineConfig
from pipeline_lib.tracking import Tracker


@contextmanager
def stage_run(config: PipelineConfig, stage: str) -> Iterator[Tracker]:
    """A nested MLflow run for one stage under the pipeline's parent run.

    The parent is reopened for the stage's duration, so it spans the whole pipeline.
    """
    parent = os.environ.get(PARENT_ENV) or find_or_create_parent(config)
    uri = prepare_tracking_store(config)
    with (
        start_run(uri, config.tracking.experiment, run_id=parent),
        start_run(
            uri,
            config.tracking.experiment,
            run_name=stage,
            tags={"stage": stage, "seed": config.seed, "git_commit": git_commit()},
            parent_run_id=parent,
            artifact_location=config.tracking.artifact_location,
            flush_every=FLUSH_EVERY,
        ) as tracker,
    ):
        label_prefect_run(config, stage, parent, tracker.run_id)
        tracker.log_params(
            {stage: getattr(config, stage).model_dump(mode="json"), "seed": config.seed}
        )
        yield ProgressTracker(tracker, stage, PROGRESS_EVERY, _run_logger)
        if Path("params.yaml").exists():
            tracker.log_artifact("params.yaml", "pipeline")
        # dvc.lock is not logged here: DVC rewrites it after this process ends
        # (`record_final_lock` logs the one written at the end of the pipeline).


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's logger of the current flow or task run; a plain logger outside one."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("knapsack_rl")


def label_prefect_run(config: PipelineConfig, stage: str, parent: str, run_id: str | None) -> None:
    """Name the current Prefect flow run after the stage, tag it, link its MLflow run.

    Does nothing outside a Prefect flow run (e.g. in tests that call a stage's tasks).
    """
    from prefect.runtime import flow_run

    flow_run_id = flow_run.get_id()
    if not flow_run_id or run_id is None:
        return
    from prefect import get_client
    from prefect.artifacts import create_link_artifact

    strategies = config.train.strategies if stage in ("train", "evaluate") else ()
    tags = [
        f"pipeline:{parent[:8]}",
        f"stage:{stage}",
        f"seed:{config.seed}",
        *(f"strategy:{s}" for s in strategies),
    ]
    name = f"{stage}-seed{config.seed}-{parent[:8]}"
    with get_client(sync_client=True) as client:
        existing = client.read_flow_run(flow_run_id).tags
        client.update_flow_run(flow_run_id, name=name, tags=sorted(set(existing) | set(tags)))
    url = mlflow_ui_url(config, run_id)
    create_link_artifact(
        url,
        link_text=f"MLflow run of stage {stage}",
        key=f"mlflow-{stage}",
        description=f"MLflow run {run_id} (pipeline run {parent}); needs `make mlflow-ui`.",
    )
    _run_logger().info("MLflow run of stage %s: %s", stage, url)
