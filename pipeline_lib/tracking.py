"""Experiment tracking behind a small interface: the training loop talks to a `Tracker`
and never asks whether tracking is on. The caller hands it the MLflow adapter's tracker
(`pipeline_lib.adapters.mlflow_tracker.start_run`) or a `NullTracker` that records nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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

    def log_model(self, model_dir: str | Path, name: str) -> None:
        """Log a Hugging Face checkpoint directory as the run's MLflow model `name`."""
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

    def log_model(self, model_dir: str | Path, name: str) -> None:
        pass

    def child(
        self, run_name: str, tags: Mapping[str, Any] | None = None
    ) -> AbstractContextManager[NullTracker]:
        return nullcontext(self)
