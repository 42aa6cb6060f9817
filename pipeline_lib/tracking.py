"""Experiment tracking behind a small interface: MLflow when on, a do-nothing object when off.

The training loop talks to a `Tracker` and never asks whether tracking is on: the
caller hands it either an `MlflowTracker` or a `NullTracker` (see `start_run`).

Runs cross process boundaries: a flow opens the parent run, writes `tracker.run_id`
where a DVC stage can read it, and the stage (another process) opens a nested run
with `parent_run_id=`. A stage restarted after a crash passes its own `run_id=` to
keep logging into the same run.

Non-finite metric values (NaN, +-inf) are logged, not dropped: a diverged loss must
show in the run. MLflow's SQL store keeps NaN and clamps +-inf to +-max float.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

MAX_PARAM_VALUE_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_PARAMS_OR_TAGS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000
PARENT_RUN_TAG = "mlflow.parentRunId"


@runtime_checkable
class Tracker(Protocol):
    """What the pipeline logs: params, per-step metrics, tags, figures and files."""

    @property
    def run_id(self) -> str | None:
        """The tracked run's id (None when nothing is tracked)."""
        ...

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (possibly nested) params; nested keys are joined with dots."""
        ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log one step's metrics in one call."""
        ...

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values are stringified)."""
        ...

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        """Save a matplotlib figure as an artifact, e.g. `plots/allocation.png`."""
        ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file or directory into the run's artifacts (under `artifact_path`)."""
        ...

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Save a JSON/YAML-serialisable object as an artifact (format from the suffix)."""
        ...

    def child(
        self, run_name: str, tags: Mapping[str, Any] | None = None
    ) -> AbstractContextManager[Tracker]:
        """Open a nested run under this one; it ends when the context exits."""
        ...


class NullTracker:
    """A tracker that records nothing; same calls as `MlflowTracker`."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        pass

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass

    def child(
        self, run_name: str, tags: Mapping[str, Any] | None = None
    ) -> AbstractContextManager[NullTracker]:
        return nullcontext(self)


class MlflowTracker:
    """Logs to one MLflow run through an `MlflowClient` (no fluent-API global state).

    Build it with `MlflowTracker.start(...)`, which also ends the run. Metrics can be
    buffered for `flush_every` `log_metrics` calls and written in one batch: on a sqlite
    store a write costs tens of ms whatever its size. Buffered metrics are written when
    the run ends, also when it fails; only a hard kill loses them.
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_every: int = 1) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self._client = client
        self._run_id = run_id
        self._flush_every = flush_every
        self._pending_metrics: list[Any] = []
        self._pending_calls = 0

    @property
    def run_id(self) -> str:
        return self._run_id

    @classmethod
    @contextmanager
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        *,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        run_id: str | None = None,
        artifact_location: str | None = None,
        flush_every: int = 1,
    ) -> Iterator[MlflowTracker]:
        """Open a run and end it on exit: FINISHED, FAILED on an exception, KILLED on Ctrl-C.

        Args:
            tracking_uri: e.g. `sqlite:///mlflow.db` or `http://host:5000`.
            experiment: experiment name; created on first use.
            run_name: display name of a new run.
            tags: tags to set on the run.
            parent_run_id: open the new run nested under this run (any process).
            run_id: resume this existing run instead of creating one (it must belong
                to `experiment`; `run_name` and `parent_run_id` are then ignored).
            artifact_location: artifact root for a new experiment (e.g. `s3://bucket/mlflow`);
                None uses the server's default.
            flush_every: write metrics every this many `log_metrics` calls (1 = at once).
        """
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is None:
            experiment_id = _get_or_create_experiment(client, experiment, artifact_location)
            run_id = _create_run(client, experiment_id, run_name, tags, parent_run_id)
        else:
            _resume_run(client, experiment, run_id, tags)
        with _ending_run(cls(client, run_id, flush_every)) as tracker:
            yield tracker

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(k, v) for k, v in flatten_params(params).items()]
        for chunk in _chunks(entries, MAX_PARAMS_OR_TAGS_PER_BATCH):
            self._client.log_batch(self._run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        self._pending_metrics += [
            Metric(k, float(v), timestamp_ms, step or 0) for k, v in metrics.items()
        ]
        self._pending_calls += 1
        if self._pending_calls >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        """Write buffered metrics now, in as few batches as MLflow allows."""
        pending, self._pending_metrics, self._pending_calls = self._pending_metrics, [], 0
        # One batch = one store transaction; ~20x cheaper than a call per metric on sqlite.
        for chunk in _chunks(pending, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_OR_TAGS_PER_BATCH):
            self._client.log_batch(self._run_id, tags=chunk)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        self._client.log_figure(self._run_id, figure, artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if Path(local_path).is_dir():
            self._client.log_artifacts(self._run_id, str(local_path), artifact_path)
        else:
            self._client.log_artifact(self._run_id, str(local_path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._client.log_dict(self._run_id, obj, artifact_file)

    def child(
        self, run_name: str, tags: Mapping[str, Any] | None = None
    ) -> AbstractContextManager[MlflowTracker]:
        return self._open_child(run_name, tags)

    @contextmanager
    def _open_child(self, run_name: str, tags: Mapping[str, Any] | None) -> Iterator[MlflowTracker]:
        experiment_id = self._client.get_run(self._run_id).info.experiment_id
        run_id = _create_run(self._client, experiment_id, run_name, tags, self._run_id)
        with _ending_run(MlflowTracker(self._client, run_id, self._flush_every)) as tracker:
            yield tracker


def start_run(
    tracking_uri: str | None,
    experiment: str,
    run_name: str | None = None,
    *,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    artifact_location: str | None = None,
    flush_every: int = 1,
) -> AbstractContextManager[Tracker]:
    """`MlflowTracker.start(...)`, or a `NullTracker` when `tracking_uri` is None (tracking off)."""
    if tracking_uri is None:
        return nullcontext(NullTracker())
    return MlflowTracker.start(
        tracking_uri,
        experiment,
        run_name,
        tags=tags,
        parent_run_id=parent_run_id,
        run_id=run_id,
        artifact_location=artifact_location,
        flush_every=flush_every,
    )


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested mapping or dataclass -> flat `{"train.lr": "0.0001"}` with MLflow-sized values.

    Lists and tuples become JSON; values longer than MLflow's limit are cut and end in "...".
    """
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or (
            dataclasses.is_dataclass(value) and not isinstance(value, type)
        ):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)
        if len(text) > MAX_PARAM_VALUE_CHARS:
            text = text[: MAX_PARAM_VALUE_CHARS - 3] + "..."
        flat[name] = text
    return flat


def _get_or_create_experiment(
    client: MlflowClient, name: str, artifact_location: str | None
) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:
        # Another process (a parallel DVC stage) created it between our two calls.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _create_run(
    client: MlflowClient,
    experiment_id: str,
    run_name: str | None,
    tags: Mapping[str, Any] | None,
    parent_run_id: str | None,
) -> str:
    from mlflow.tracking.context.registry import resolve_tags

    # resolve_tags adds what mlflow.start_run would: user, entry-point file, git commit.
    run_tags = resolve_tags({k: str(v) for k, v in (tags or {}).items()})
    if parent_run_id is not None:
        run_tags[PARENT_RUN_TAG] = parent_run_id
    run = client.create_run(experiment_id, tags=run_tags, run_name=run_name)
    return run.info.run_id


def _resume_run(
    client: MlflowClient, experiment: str, run_id: str, tags: Mapping[str, Any] | None
) -> None:
    run = client.get_run(run_id)
    found = client.get_experiment(run.info.experiment_id).name
    if found != experiment:
        # A stale run-id file from another experiment: refuse rather than mix runs.
        raise ValueError(f"run {run_id} belongs to experiment {found!r}, not {experiment!r}")
    client.update_run(run_id, status="RUNNING")
    if tags:
        MlflowTracker(client, run_id).set_tags(tags)


@contextmanager
def _ending_run(tracker: MlflowTracker) -> Iterator[MlflowTracker]:
    status = "FINISHED"
    try:
        yield tracker
    except Exception:
        status = "FAILED"
        raise
    except BaseException:
        status = "KILLED"
        raise
    finally:
        try:
            tracker.flush()  # the last steps before a crash are the ones worth reading
        finally:
            tracker._client.set_terminated(tracker.run_id, status=status)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
