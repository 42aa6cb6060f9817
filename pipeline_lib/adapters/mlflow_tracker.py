"""The MLflow adapter's `Tracker`: `MlflowTracker` and `start_run` (the interface and its
do-nothing twin are in `pipeline_lib.tracking`).

Runs cross process boundaries: a flow opens the parent run, writes `tracker.run_id`
where a DVC stage can read it, and the stage (another process) opens a nested run
with `parent_run_id=`. A stage restarted after a crash passes its own `run_id=` to
keep logging into the same run.

Non-finite metric values (NaN, +-inf) are logged, not dropped: a diverged loss must
show in the run. MLflow's SQL store keeps NaN and clamps +-inf to +-max float.

A tracking server that stops answering does not stop training: `MlflowTracker` keeps
what it could not send (metrics, params, tags, and figures and artifacts staged as
local copies), tries again at most every `retry_after_s`, and sends it all, in order,
once the server is back; at the end of the run it waits up to `final_flush_timeout_s`
for the server before giving up with an error naming what was not sent. How long
one attempt may block is MLflow's own setting (MLFLOW_HTTP_REQUEST_MAX_RETRIES,
MLFLOW_HTTP_REQUEST_TIMEOUT).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline_lib.adapters.redaction import redact_mapping, secret_values

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
import dataclasses

from pipeline_lib.tracking import NullTracker, Tracker

MAX_PARAM_VALUE_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_PARAMS_OR_TAGS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000
PARENT_RUN_TAG = "mlflow.parentRunId"
RETRY_AFTER_S = 10.0  # while the server is unreachable, try again at most this often
FINAL_FLUSH_TIMEOUT_S = 120.0  # at the end of a run, wait this long for the server
# What a logged policy needs to load back, pinned when logged (MLflow adds itself).
MODEL_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors")

# What MLflow's REST client says when the server is down, restarting or overloaded.
UNREACHABLE_MARKERS = (
    "Max retries exceeded",
    "Connection refused",
    "ConnectionError",
    "Read timed out",
    "error code 5",
)

logger = logging.getLogger(__name__)


class MlflowTracker:
    """Logs to one MLflow run through an `MlflowClient` (no fluent-API global state).

    Build it with `MlflowTracker.start(...)`, which also ends the run. Metrics can be
    buffered for `flush_every` `log_metrics` calls and written in one batch: on a sqlite
    store a write costs tens of ms whatever its size. Buffered metrics are written when
    the run ends, also when it fails; only a hard kill loses them. Whatever the server
    refuses to take because it cannot be reached waits in the buffer (module docstring).
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        flush_every: int = 1,
        *,
        retry_after_s: float = RETRY_AFTER_S,
        final_flush_timeout_s: float = FINAL_FLUSH_TIMEOUT_S,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self._client = client
        self._run_id = run_id
        self._flush_every = flush_every
        self._retry_after_s = retry_after_s
        self._final_flush_timeout_s = final_flush_timeout_s
        self._pending_metrics: list[Any] = []
        self._pending_calls = 0
        # Calls the server has not taken yet, in order: ("batch", kwargs) or ("artifact", ...).
        self._backlog: list[tuple[str, Any]] = []
        self._unreachable_since: float | None = None
        self._last_attempt = 0.0
        self._staging: Path | None = None  # local copies of artifacts not yet uploaded

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def backlog_size(self) -> int:
        """Calls (batches and artifacts) waiting for the server, buffered metrics aside."""
        return len(self._backlog)

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

        flat = redact_mapping(flatten_params(params), secret_values(os.environ))
        entries = [Param(k, v) for k, v in flat.items()]
        for chunk in _chunks(entries, MAX_PARAMS_OR_TAGS_PER_BATCH):
            self._send("batch", {"params": chunk})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        self._pending_metrics += [
            Metric(k, float(v), timestamp_ms, step or 0) for k, v in metrics.items()
        ]
        self._pending_calls += 1
        if self._pending_calls >= self._flush_every:
            self._queue_pending_metrics()
            self._drain(force=False)

    def flush(self) -> None:
        """Write buffered metrics now, in as few batches as MLflow allows.

        While the server is unreachable they stay queued (tried again later); raises only
        the errors of a server that answers (bad request, unknown run...).
        """
        self._queue_pending_metrics()
        self._drain(force=True)

    def _queue_pending_metrics(self) -> None:
        pending, self._pending_metrics, self._pending_calls = self._pending_metrics, [], 0
        # One batch = one store transaction; ~20x cheaper than a call per metric on sqlite.
        for chunk in _chunks(pending, MAX_METRICS_PER_BATCH):
            self._backlog.append(("batch", {"metrics": chunk}))

    def _send(self, kind: str, payload: Any) -> None:
        self._backlog.append((kind, payload))
        self._drain(force=False)

    def _drain(self, *, force: bool) -> bool:
        """Send the backlog in order; True when it is empty. Stops at an unreachable server."""
        if not self._backlog:
            return True
        now = time.monotonic()
        if (
            not force
            and self._unreachable_since is not None
            and now - self._last_attempt < self._retry_after_s
        ):
            return False
        self._last_attempt = now
        while self._backlog:
            kind, payload = self._backlog[0]
            try:
                if kind == "batch":
                    self._client.log_batch(self._run_id, **payload)
                elif kind == "model":
                    self._log_model(*payload)
                else:
                    local_path, artifact_path = payload
                    self._upload(local_path, artifact_path)
            except Exception as error:
                if not _is_unreachable(error):
                    self._backlog.pop(0)  # the server answered and refused: do not resend
                    raise
                if self._unreachable_since is None:
                    self._unreachable_since = now
                    logger.warning(
                        "MLflow server unreachable (%s); buffering and retrying every %.0f s",
                        type(error).__name__,
                        self._retry_after_s,
                    )
                return False
            self._backlog.pop(0)
        if self._unreachable_since is not None:
            logger.warning(
                "MLflow server back after %.0f s; buffered records sent",
                now - self._unreachable_since,
            )
            self._unreachable_since = None
        self._clear_staging()
        return True

    def _finish(self) -> None:
        """Send everything left, waiting up to `final_flush_timeout_s` for the server."""
        self._queue_pending_metrics()
        deadline = time.monotonic() + self._final_flush_timeout_s
        while not self._drain(force=True):
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"MLflow run {self._run_id}: the server did not come back within "
                    f"{self._final_flush_timeout_s:.0f} s; {len(self._backlog)} buffered "
                    "calls (metrics, params, tags, artifacts) were not sent"
                )
            time.sleep(min(self._retry_after_s, 2.0))

    def _stage(self, name: str) -> Path:
        """A local path to keep a copy of an artifact until the server takes it."""
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="mlflow-backlog-"))
        path = self._staging / f"{len(self._backlog)}-{time.monotonic_ns()}" / name
        path.parent.mkdir(parents=True)
        return path

    def _clear_staging(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _upload(self, local_path: str, artifact_path: str | None) -> None:
        if Path(local_path).is_dir():
            self._client.log_artifacts(self._run_id, local_path, artifact_path)
        else:
            self._client.log_artifact(self._run_id, local_path, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        text = redact_mapping({k: str(v) for k, v in tags.items()}, secret_values(os.environ))
        entries = [RunTag(k, v) for k, v in text.items()]
        for chunk in _chunks(entries, MAX_PARAMS_OR_TAGS_PER_BATCH):
            self._send("batch", {"tags": chunk})

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        # Saved locally first: the figure may be changed or closed before the upload.
        local = self._stage(Path(artifact_file).name)
        figure.savefig(local)
        self._send("artifact", (str(local), _artifact_dir(artifact_file)))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._send("artifact", (self._as_now(local_path), artifact_path))

    def log_model(self, model_dir: str | Path, name: str) -> None:
        """`mlflow.transformers.log_model` of the checkpoint directory, as a text-generation
        model: it shows under the run's and the experiment's logged models and loads back
        with `mlflow.transformers.load_model` / `mlflow.pyfunc.load_model`."""
        self._send("model", (self._as_now(model_dir), name))

    def _as_now(self, local_path: str | Path) -> str:
        """The path to send; while the server is away, a copy of the file as it is now."""
        if not self._backlog:
            return str(local_path)
        local = self._stage(Path(local_path).name)
        if Path(local_path).is_dir():
            shutil.copytree(local_path, local)
        else:
            shutil.copy2(local_path, local)
        return str(local)

    def _log_model(self, model_dir: str, name: str) -> None:
        import mlflow.transformers
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        # Created here, in the run's experiment: left to itself, log_model would put the
        # model in the fluent API's active experiment (the default one). Requirements are
        # given, not inferred: inference loads the model in a subprocess (slow for a real one).
        experiment_id = self._client.get_run(self._run_id).info.experiment_id
        model = self._client.create_logged_model(experiment_id, name, self._run_id)
        with _use_tracking_uri(self._client.tracking_uri):  # log_model has no client argument
            mlflow.transformers.log_model(
                model_dir,  # a path: copied as it is, not loaded into memory
                name=name,
                task="text-generation",
                run_id=self._run_id,
                model_id=model.model_id,
                pip_requirements=[f"{p}=={_release(p)}" for p in MODEL_REQUIREMENTS],
            )

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        local = self._stage(Path(artifact_file).name)
        if local.suffix in (".yaml", ".yml"):
            import yaml

            local.write_text(yaml.safe_dump(obj, sort_keys=False))
        else:
            local.write_text(json.dumps(obj, indent=2))
        self._send("artifact", (str(local), _artifact_dir(artifact_file)))

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
            tracker._finish()  # the last steps before a crash are the ones worth reading
        finally:
            tracker._clear_staging()
            tracker._client.set_terminated(tracker.run_id, status=status)


def _artifact_dir(artifact_file: str) -> str | None:
    """`plots/allocation.png` -> `plots`; `a.png` -> None (the run's artifact root)."""
    parent = str(Path(artifact_file).parent)
    return None if parent == "." else parent


def _is_unreachable(error: Exception) -> bool:
    """Whether `error` says the tracking server could not be reached (vs. refused a call)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    if isinstance(error, MlflowException):
        text = str(error)
        if re.search(r"error code 4\d\d", text):  # the server answered: a bad request
            return False
        return any(marker in text for marker in UNREACHABLE_MARKERS)
    return False


def _release(package: str) -> str:
    """The installed version without a local part (`2.6.0+cpu` -> `2.6.0`)."""
    from importlib.metadata import version

    return version(package).split("+")[0]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
