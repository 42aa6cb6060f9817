"""The MLflow adapter's run bookkeeping: every lookup and link through `MlflowClient`.

One parent run per pipeline run, a nested run per stage; one parent per comparison, a
child per arm x seed.

Stages run in separate processes (each DVC stage is its own command), so the
parent is found by a tag: the pipeline key (config fingerprint + git commit), or
given outright through KNAPSACK_RL_PARENT_RUN_ID by a flow that runs all stages.

The parent spans the pipeline: every stage reopens it (RUNNING) and ends it with its
own run, so it starts with the first stage and ends with the last; the evaluate stage
writes the answer into it (`log_pipeline_result`), and `record_final_lock` (after
`dvc repro`) gives it and its stage runs the `dvc.lock` that DVC wrote at the end.

`tasks.tracking.stage_run` composes these for a stage (and labels its Prefect flow run);
`ProgressTracker` writes a progress line to a given log every `PROGRESS_EVERY` steps.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline_lib.adapters.mlflow_tracker import PARENT_RUN_TAG, MlflowTracker, start_run
from pipeline_lib.config import PipelineConfig
from pipeline_lib.tracking import Tracker

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
    "uniform-0.5x": "#17becf",
    "uniform-4x": "#393b79",
    "knapsack-equal-weight": "#bcbd22",
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
DEFAULT_LOG = logging.getLogger("knapsack_rl")


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


class ProgressTracker:
    """A `Tracker` that forwards everything and writes a progress line to `log()` (the
    caller's run log, e.g. Prefect's run logger) every `every` logged steps."""

    def __init__(
        self,
        inner: Tracker,
        label: str,
        every: int = PROGRESS_EVERY,
        log: Callable[[], logging.Logger | logging.LoggerAdapter] = lambda: DEFAULT_LOG,
    ) -> None:
        self._inner, self._label, self._every, self._log = inner, label, every, log

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
            self._log().info("%s step %d: %s", self._label, step, shown)

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
            yield ProgressTracker(child, run_name, self._every, self._log)


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


# --- comparisons: one parent run, a child per arm x seed ---

ARM_TAG, SEED_TAG, RUN_KEY_TAG = "arm", "seed", "knapsack_rl.compare_run_key"
REUSED_TAG = "knapsack_rl.reused_from_run"


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
        f"**Comparison** ({compare.set}) of {', '.join(compare.selected_arms)} against "
        f"{compare.baseline}: seeds "
        f"{list(compare.seeds)}, {compare.steps} steps each, one start policy; "
        f"commit `{git_commit()[:12]}`. Children: one run per arm x seed."
    )
    tags = {
        "stage": "compare",
        "arms": ",".join(compare.selected_arms),
        "compare_set": compare.set,
        "seeds": ",".join(map(str, compare.seeds)),
        "git_commit": git_commit(),
        NOTE_TAG: note,
    }
    with start_run(
        uri,
        config.tracking.experiment,
        run_name=f"{compare.result_name}-{config.fingerprint()[:8]}",
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
