"""MLflow runs for stages: one parent run per pipeline run, a nested run per stage.

Stages run in separate processes (each DVC stage is its own command), so the
parent is found by a tag: the pipeline key (config fingerprint + git commit), or
given outright through KNAPSACK_RL_PARENT_RUN_ID by a flow that runs all stages.

The parent spans the pipeline: every stage reopens it (RUNNING) and ends it with its
own run, so it starts with the first stage and ends with the last; the evaluate stage
writes the answer into it (`log_pipeline_result`), and `record_final_lock` (after
`dvc repro`) gives it and its stage runs the `dvc.lock` that DVC wrote at the end.

Inside a Prefect flow run, `stage_run` also names the flow run after the stage, tags
it (pipeline run, stage, seed) and links it to its MLflow run; the tracker it yields
writes a progress line to the Prefect run log every `PROGRESS_EVERY` logged steps.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline_lib.config import PipelineConfig
from pipeline_lib.tracking import PARENT_RUN_TAG, MlflowTracker, Tracker, start_run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PARENT_ENV = "KNAPSACK_RL_PARENT_RUN_ID"
PIPELINE_KEY_TAG = "knapsack_rl.pipeline_key"
# MLflow 3's UI opens an experiment in its GenAI mode (traces) unless told otherwise:
# "custom_model_development" is its "Machine learning" kind (runs table, training charts).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI (markdown)
# A run's colour in the MLflow UI's charts and tables (what its colour picker stores).
# Per strategy, the colours of the DVC plots (.dvc/plots/*.json's colour scale), so a
# strategy looks the same everywhere.
RUN_COLOR_TAG = "mlflow.runColor"
STRATEGY_COLORS = {
    "knapsack": "#d62728",
    "uniform": "#1f77b4",
    "uniform-2x": "#9467bd",
    "dynamic-sampling": "#2ca02c",
    "knapsack-no-fallback": "#ff7f0e",
    "knapsack-gradient-only": "#8c564b",
    "knapsack-official": "#e377c2",
}
# Where `make mlflow-ui` serves the UI; links in Prefect and in run descriptions use it.
MLFLOW_UI_ENV = "KNAPSACK_RL_MLFLOW_UI"
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"
LOCK_ARTIFACT_DIRS = {"parent": "dvc", "stage": "pipeline"}
# A progress line in the Prefect run log every this many training steps.
PROGRESS_EVERY = 20
PROGRESS_KEYS = (
    "rollout/effective_gradient_ratio",
    "rollout/success_rate",
    "train/loss",
    "eval/accuracy",
    "time/step_seconds",
)


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
    tags = {
        PIPELINE_KEY_TAG: key,
        "git_commit": git_commit(),
        "seed": config.seed,
        "strategies": ",".join(config.train.strategies),
        NOTE_TAG: pipeline_description(config),
    }
    with start_run(
        uri,
        config.tracking.experiment,
        run_name=f"pipeline-{key[:8]}",
        tags=tags,
        artifact_location=config.tracking.artifact_location,
    ) as parent:
        parent.log_params(config.model_dump(mode="json"))
        run_id = str(parent.run_id)
    experiment_id = client.get_run(run_id).info.experiment_id
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return run_id


def pipeline_description(config: PipelineConfig, results: str = "") -> str:
    """The parent run's description: what ran, then (once evaluated) the results."""
    train = config.train
    text = (
        f"**knapsack-rl pipeline**, seed {config.seed}, commit `{git_commit()[:12]}`: "
        f"policy `{config.bootstrap.model}` trained with {', '.join(train.strategies)} "
        f"allocation at the same budget ({train.steps} steps x {train.prompts_per_step} "
        f"prompts x {train.rollouts_per_prompt} rollouts on average), then evaluated."
    )
    pending = "*Running: the results come with the evaluate stage.*"
    return f"{text}\n\n{results or pending}"


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
        yield ProgressTracker(tracker, stage, PROGRESS_EVERY)
        if Path("params.yaml").exists():
            tracker.log_artifact("params.yaml", "pipeline")
        # dvc.lock is not logged here: DVC rewrites it after this process ends
        # (`record_final_lock` logs the one written at the end of the pipeline).


class ProgressTracker:
    """A `Tracker` that forwards everything and writes a progress line to the run log
    (Prefect's run logger inside a flow or task run) every `every` logged steps."""

    def __init__(self, inner: Tracker, label: str, every: int = PROGRESS_EVERY) -> None:
        self._inner, self._label, self._every = inner, label, every

    @property
    def run_id(self) -> str | None:
        return self._inner.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._inner.log_metrics(metrics, step)
        if step and step % self._every == 0:
            shown = ", ".join(
                f"{key.split('/')[-1]} {metrics[key]:.3g}"
                for key in PROGRESS_KEYS
                if key in metrics and not math.isnan(metrics[key])
            )
            _run_logger().info("%s step %d: %s", self._label, step, shown)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._inner.log_params(params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._inner.set_tags(tags)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        self._inner.log_figure(figure, artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._inner.log_artifact(local_path, artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._inner.log_dict(obj, artifact_file)

    def log_model(self, model_dir: str | Path, name: str) -> None:
        self._inner.log_model(model_dir, name)

    @contextmanager
    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
        """A nested run; a strategy's run (tag `strategy`) also gets its colour."""
        color = STRATEGY_COLORS.get(str((tags or {}).get("strategy")))
        if color is not None:
            tags = {**tags, RUN_COLOR_TAG: color}
        with self._inner.child(run_name, tags) as child:
            yield ProgressTracker(child, run_name, self._every)


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's logger of the current flow or task run; a plain logger outside one."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("knapsack_rl")


def mlflow_ui_url(config: PipelineConfig, run_id: str | None = None) -> str:
    """The MLflow UI page of the experiment (training view), or of one run."""
    from mlflow import MlflowClient

    base = os.environ.get(MLFLOW_UI_ENV, DEFAULT_MLFLOW_UI).rstrip("/")
    client = MlflowClient(tracking_uri=prepare_tracking_store(config))
    if run_id is None:
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        path = f"experiments/{experiment.experiment_id}/runs" if experiment else "experiments"
    else:
        run = client.get_run(run_id)
        path = f"experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"{base}/#/{path}?workflowType=machine_learning"


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


def append_to_run(config: PipelineConfig, run_id: str) -> Tracker:
    """A tracker that logs into an existing (finished) run without reopening it: its
    status and end time stay as they were."""
    from mlflow import MlflowClient

    return MlflowTracker(MlflowClient(tracking_uri=prepare_tracking_store(config)), run_id)


def pipeline_parent(config: PipelineConfig) -> str | None:
    """The parent run of this pipeline run, if one exists (never creates one)."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    return find_run_by_tag(config, PIPELINE_KEY_TAG, pipeline_key(config))


def child_runs(config: PipelineConfig, parent: str, extra_filter: str = "") -> list[Any]:
    """The runs nested directly under `parent` (newest first), optionally filtered."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=prepare_tracking_store(config))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return []
    query = " and ".join(filter(None, [f"tags.`{PARENT_RUN_TAG}` = '{parent}'", extra_filter]))
    return client.search_runs(
        [experiment.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"]
    )


def strategy_runs(config: PipelineConfig, parent: str) -> dict[str, str]:
    """strategy -> its newest training run under this pipeline's train stage runs."""
    found: dict[str, tuple[int, str]] = {}
    for train_run in child_runs(config, parent, "tags.stage = 'train'"):
        for run in child_runs(config, train_run.info.run_id, "tags.strategy != ''"):
            strategy = run.data.tags["strategy"]
            if strategy not in found or run.info.start_time > found[strategy][0]:
                found[strategy] = (run.info.start_time, run.info.run_id)
    return {strategy: run_id for strategy, (_, run_id) in found.items()}


def stage_links(config: PipelineConfig, parent: str) -> str:
    """Markdown links (relative, so they work on any MLflow host) to the stage runs."""
    newest: dict[str, Any] = {}
    for run in child_runs(config, parent):
        newest.setdefault(run.data.tags.get("stage", run.info.run_name), run)
    links = [
        f"[{stage}](#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        "?workflowType=machine_learning)"
        for stage, run in newest.items()
    ]
    return "Stage runs: " + " · ".join(reversed(links)) if links else ""


def record_final_lock(
    config: PipelineConfig, lock: Path = Path("dvc.lock"), parent: str | None = None
) -> str | None:
    """After `dvc repro`: log the final dvc.lock into the parent run and its stage runs.

    DVC writes a stage's lock entry after the stage's process has ended, so only this
    copy pins what every run produced. `parent` defaults to this pipeline run's parent.
    Returns the parent run id (None: no parent).
    """
    parent = parent or pipeline_parent(config)
    if parent is None or not lock.exists():
        return None
    append_to_run(config, parent).log_artifact(lock, LOCK_ARTIFACT_DIRS["parent"])
    for run in child_runs(config, parent):
        append_to_run(config, run.info.run_id).log_artifact(lock, LOCK_ARTIFACT_DIRS["stage"])
    return parent


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
