"""Compute accounting: what each training step spent, and the running totals.

Per step (`step_compute`), under `compute/`:

- `rollouts`: rollouts generated, every sampling round included (dynamic sampling
  pays for the groups it drops);
- `prompt_tokens`: prompt tokens submitted to the engine, each drawn prompt's
  length once per round (its samples share one prefill);
- `completion_tokens`: completion tokens generated;
- `update_rows`: rollouts handed to the update (the kept groups');
  `update_signal_rows`: those with a non-zero advantage (what the policy-gradient
  pass computes on without a KL term); `update_tokens`: prompt + completion tokens
  of the update rows;
- `rollout_seconds` (allocation, generation and grading: the wall time of
  `sample_step`), `update_seconds`, `sync_seconds` (weights into the engine).

`accumulate` adds each to the previous step's `compute/<name>_total`, plus
`compute/seconds_total` = rollout + update + sync seconds. A comparison plots
held-out accuracy against these totals (`evaluation_curve`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from pipeline_lib.rollout.base import Completion
from pipeline_lib.training.steps import StepRollouts

COMPUTE_KEYS = (
    "rollouts",
    "prompt_tokens",
    "completion_tokens",
    "update_rows",
    "update_signal_rows",
    "update_tokens",
    "rollout_seconds",
    "update_seconds",
    "sync_seconds",
)
SECONDS_KEYS = ("rollout_seconds", "update_seconds", "sync_seconds")


@dataclass(frozen=True)
class StepSeconds:
    """Wall time of a step's three phases."""

    rollout: float
    update: float
    sync: float


def step_compute(
    rollouts: StepRollouts,
    update_completions: Sequence[Completion],
    update_advantages: torch.Tensor,
    seconds: StepSeconds,
) -> dict[str, float]:
    """The step's `compute/` metrics (module docstring), plus rounds, prompts and groups."""
    # One group per drawn prompt and round (a prompt with 0 rollouts is not submitted).
    group_ids = rollouts.batch.group_ids.tolist()
    first_of_group = {g: c for g, c in zip(group_ids, rollouts.batch.completions, strict=True)}
    return {
        "compute/rollouts": float(len(rollouts.batch.completions)),
        "compute/prompt_tokens": float(
            sum(len(c.prompt_token_ids) for c in first_of_group.values())
        ),
        "compute/completion_tokens": float(
            sum(len(c.token_ids) for c in rollouts.batch.completions)
        ),
        "compute/update_rows": float(len(update_completions)),
        "compute/update_signal_rows": float((update_advantages != 0).sum()),
        "compute/update_tokens": float(
            sum(len(c.prompt_token_ids) + len(c.token_ids) for c in update_completions)
        ),
        "compute/rollout_seconds": seconds.rollout,
        "compute/update_seconds": seconds.update,
        "compute/sync_seconds": seconds.sync,
        "rollout/rounds": float(rollouts.rounds),
        "rollout/prompts": float(rollouts.indices.size),
        "update/groups": float(rollouts.kept.sum()),
    }


# Names of wall-clock measurements (`time/step_seconds`, `rollout/tokens_per_s`,
# `mean_step_seconds`, ...): they differ on every run, so the outputs that a rerun must
# reproduce bit for bit (models/trained) leave them out; MLflow and
# metrics/timing.json have them.
WALL_CLOCK_MARKERS = ("seconds", "per_s", "time/")


def is_wall_clock(name: str) -> bool:
    """Whether a metric or summary name is a wall-clock measurement."""
    return any(marker in name for marker in WALL_CLOCK_MARKERS)


def _number(value: object) -> float:
    """A history value as a float; missing or NaN (a CSV round trip) counts as 0."""
    if value is None:
        return 0.0
    number = float(value)  # type: ignore[arg-type]
    return 0.0 if math.isnan(number) else number


def accumulate(previous: Mapping[str, float], step: Mapping[str, float]) -> dict[str, float]:
    """`compute/<name>_total` after this step: the previous record's totals plus the step's."""
    totals = {
        f"compute/{key}_total": _number(previous.get(f"compute/{key}_total"))
        + step[f"compute/{key}"]
        for key in COMPUTE_KEYS
    }
    totals["compute/seconds_total"] = sum(totals[f"compute/{k}_total"] for k in SECONDS_KEYS)
    return totals


def evaluation_curve(steps: pd.DataFrame) -> pd.DataFrame:
    """A run's held-out accuracy against its cumulative compute, one row per evaluation.

    Args:
        steps: the run's metric history (`TrainingResult.steps`, or its CSV).
    Returns:
        columns step, accuracy, rollouts, tokens (completion tokens generated),
        seconds (rollout + update + sync): the totals after that step, 0 at step 0.
    """
    evaluated = steps[steps["eval/accuracy"].notna()].sort_values("step")
    totals = {
        "rollouts": "compute/rollouts_total",
        "tokens": "compute/completion_tokens_total",
        "seconds": "compute/seconds_total",
    }
    curve = pd.DataFrame(
        {"step": evaluated["step"].astype(int), "accuracy": evaluated["eval/accuracy"]}
    )
    for name, column in totals.items():
        values = evaluated[column] if column in evaluated else pd.Series(0.0, evaluated.index)
        curve[name] = values.fillna(0.0).astype(float)
    return curve.reset_index(drop=True)
