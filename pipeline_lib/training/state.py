"""What a training run must keep to continue after a crash, and where it keeps it.

`TrainState` is everything the loop carries from one step to the next besides the
policy weights; a `Checkpointer` saves it with the weights and restores both. The
loop sees only the interface: `DirectoryCheckpointer` writes folders,
`NullCheckpointer` (tests, throwaway runs) keeps nothing. Tracking is not part of
the state: the MLflow run of an interrupted attempt is found by its tags.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import transformers

from pipeline_lib.adapters.atomic import atomic_directory, atomic_file, recover_directory
from pipeline_lib.policy.checkpoint import transformers_progress_bars_off
from pipeline_lib.status import STATUS_SCHEMA, empty_status

CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainState:
    """The loop's state after `step` completed steps (the next step to run is `step`)."""

    step: int = 0
    status: pd.DataFrame = field(default_factory=empty_status)
    """Per-prompt rollout history (`status.py`): the allocation's input."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One metrics record per completed step (and the step-0 evaluation)."""
    optimizer_state: dict[str, Any] | None = None
    """The updater's optimiser state; None before the first checkpoint."""
    rng_state: torch.Tensor | None = None
    """torch's CPU generator, so a resumed run draws what the straight run would."""


class Checkpointer(Protocol):
    """Saves and restores a run's `TrainState` together with its policy weights."""

    def restore(self, model: transformers.PreTrainedModel) -> TrainState | None:
        """Load the saved weights into `model` and return the state; None if nothing saved."""
        ...

    def save(
        self,
        state: TrainState,
        model: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
    ) -> None:
        """Save state and weights so that a crash at any moment leaves a loadable checkpoint."""
        ...


class NullCheckpointer:
    """Keeps nothing: every run starts fresh."""

    def restore(self, model: transformers.PreTrainedModel) -> TrainState | None:
        return None

    def save(
        self,
        state: TrainState,
        model: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
    ) -> None:
        pass


class DirectoryCheckpointer:
    """One checkpoint folder under `state_dir`, replaced atomically at every save.

    The folder holds the policy (safetensors), the optimiser and RNG state (loaded
    with `weights_only=True`), the status table (parquet), the metric history (CSV)
    and `meta.json` with the step and `fingerprint`. A checkpoint whose fingerprint
    differs (another config, data or start policy) is ignored.
    """

    def __init__(self, state_dir: str | Path, fingerprint: str) -> None:
        self.state_dir = Path(state_dir)
        self.fingerprint = fingerprint

    @property
    def path(self) -> Path:
        return self.state_dir / CHECKPOINT_DIR

    def saved_step(self) -> int | None:
        """Completed steps in the matching checkpoint, or None when there is none."""
        recover_directory(self.path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            return None
        meta = json.loads(meta_file.read_text())
        return int(meta["step"]) if meta.get("fingerprint") == self.fingerprint else None

    def restore(self, model: transformers.PreTrainedModel) -> TrainState | None:
        step = self.saved_step()
        if step is None:
            return None
        saved = type(model).from_pretrained(
            self.path / "policy", dtype=model.dtype, use_safetensors=True
        )
        model.load_state_dict(saved.state_dict())
        rng_file = self.path / "rng.pt"
        return TrainState(
            step=step,
            status=load_status(self.path / "status.parquet"),
            history=pd.read_csv(self.path / "history.csv").to_dict("records"),
            optimizer_state=torch.load(self.path / "optimizer.pt", weights_only=True),
            rng_state=torch.load(rng_file, weights_only=True) if rng_file.exists() else None,
        )

    def save(
        self,
        state: TrainState,
        model: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
    ) -> None:
        with atomic_directory(self.path) as staging:
            with transformers_progress_bars_off():  # one bar a step would bury the loop's
                model.save_pretrained(staging / "policy")
            tokenizer.save_pretrained(staging / "policy")
            torch.save(state.optimizer_state, staging / "optimizer.pt")
            if state.rng_state is not None:
                torch.save(state.rng_state, staging / "rng.pt")
            save_status(state.status, staging / "status.parquet")
            pd.DataFrame(state.history).to_csv(staging / "history.csv", index=False)
            meta = {"step": state.step, "fingerprint": self.fingerprint}
            (staging / "meta.json").write_text(json.dumps(meta))


def save_status(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Validate ``table`` and write it to parquet at ``path`` atomically.

    Validation comes first and the write goes through ``atomic_file``: a crash or a
    validation error never leaves a partial or invalid file, and an existing file
    stays as it was.
    """
    STATUS_SCHEMA.validate(table)
    with atomic_file(path) as tmp:
        table.to_parquet(tmp, index=False)
    return Path(path)


def load_status(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a status table written by ``save_status`` and validate it."""
    table = pd.read_parquet(path)
    # Parquet lists come back as numpy arrays; the schema wants plain lists of ints.
    for column in ("window_rollouts", "window_successes"):
        table[column] = pd.Series(
            [[int(v) for v in values] for values in table[column]], index=table.index, dtype=object
        )
    table["prompt_id"] = table["prompt_id"].astype("str")
    for column in ("solved_streak", "unsolved_streak"):  # tables saved before they existed
        if column not in table.columns:
            table[column] = np.zeros(len(table), dtype=np.int64)
    return STATUS_SCHEMA.validate(table)
