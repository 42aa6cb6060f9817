"""A comparison's runs: the settings of each arm x seed run, its cache key, its result record.

A run is one strategy (arm) trained with one seed from the shared start policy, with
the `train` section's settings and `compare.steps` steps. Its key hashes everything
its result depends on (settings, seed, start policy, data, training code), so a
finished run's record can be reused by any later comparison that needs that run:
adding a seed trains only the new seed's runs.

A record is a JSON-ready dict (what `run_record` returns); `arm_runs` turns the
records back into `compare_stats.ArmRuns` for the statistics.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline_lib.comparison.dose_response import primary_value
from pipeline_lib.comparison.stats import ArmRuns
from pipeline_lib.config import PipelineConfig
from pipeline_lib.training.compute import evaluation_curve

RECORD_VERSION = 1
EGR_COLUMN = "rollout/effective_gradient_ratio"


@dataclass(frozen=True)
class RunInputs:
    """What every run of a comparison starts from, as paths and content hashes."""

    start_policy: str
    start_hash: str
    train_path: str
    heldout_path: str
    data_hash: str
    code_hash: str


def run_config(config: PipelineConfig, arm: str, seed: int) -> PipelineConfig:
    """The pipeline config one arm x seed run trains with (train.steps = compare.steps)."""
    train = config.train.model_copy(update={"steps": config.compare.steps, "strategies": (arm,)})
    return config.model_copy(update={"seed": seed, "train": train})


def run_key(config: PipelineConfig, arm: str, seed: int, inputs: RunInputs) -> str:
    """Hash of everything a run's result depends on (not the other arms or seeds)."""
    settings = run_config(config, arm, seed)
    blob = {
        "version": RECORD_VERSION,
        "arm": arm,
        "seed": seed,
        "threads": settings.threads,
        "train": settings.train.model_dump(mode="json", exclude={"strategies", "output_dir"}),
        "prompt_template": settings.bootstrap.prompt_template,
        "instruction": settings.bootstrap.instruction,
        "start_hash": inputs.start_hash,
        "data_hash": inputs.data_hash,
        "code_hash": inputs.code_hash,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def run_name(arm: str, seed: int, key: str) -> str:
    """The folder (and label) of a run: `<arm>-seed<seed>-<key>`."""
    return f"{arm}-seed{seed}-{key}"


def run_record(
    arm: str,
    seed: int,
    key: str,
    steps: pd.DataFrame,
    prompt_scores: Sequence[float],
    train_seconds: float,
    mlflow_run_id: str | None,
) -> dict:
    """A finished run's record: final per-prompt scores, evaluation curve, compute, EGR.

    Args:
        steps: the run's metric history (`TrainingResult.steps`).
        prompt_scores: float[J] final held-out reward per prompt.
        train_seconds: wall time of the whole run (engine sync, evaluation included).
    """
    trained = steps[steps["step"] > 0]
    last = steps.iloc[-1]
    totals = {k: float(v) for k, v in last.items() if str(k).endswith("_total")}
    return {
        "version": RECORD_VERSION,
        "arm": arm,
        "seed": int(seed),
        "key": key,
        "final_accuracy": float(np.mean(prompt_scores)),
        "prompt_scores": [float(s) for s in prompt_scores],
        "effective_gradient_ratio": float(trained[EGR_COLUMN].mean()),
        "effective_gradient_ratio_per_step": {
            "step": trained["step"].astype(int).tolist(),
            "value": trained[EGR_COLUMN].astype(float).tolist(),
        },
        "curve": evaluation_curve(steps).to_dict(orient="list"),
        "compute_totals": totals,
        "train_seconds": float(train_seconds),
        "mlflow_run_id": mlflow_run_id,
    }


def arm_runs(
    records: Sequence[Mapping], arms: Sequence[str], primary_metric: str | None = None
) -> dict[str, ArmRuns]:
    """Records grouped by arm, seeds in ascending order, as the statistics take them
    (with each run's `primary_metric` value when one is named)."""
    grouped: dict[str, ArmRuns] = {}
    for arm in arms:
        mine = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        if not mine:
            raise ValueError(f"no finished run of arm {arm!r}")
        grouped[arm] = ArmRuns(
            seeds=tuple(int(r["seed"]) for r in mine),
            prompt_scores=np.asarray([r["prompt_scores"] for r in mine], np.float64),
            effective_gradient_ratios=np.asarray(
                [r["effective_gradient_ratio"] for r in mine], np.float64
            ),
            curves=tuple(pd.DataFrame(r["curve"]) for r in mine),
            primary=tuple(primary_value(r, primary_metric) for r in mine) if primary_metric else (),
        )
    return grouped


def curves_table(records: Sequence[Mapping]) -> pd.DataFrame:
    """Every run's evaluation curve in one long table (arm, seed, step, accuracy, compute)."""
    return pd.concat(
        [pd.DataFrame(r["curve"]).assign(arm=r["arm"], seed=r["seed"]) for r in records],
        ignore_index=True,
    )


def egr_table(records: Sequence[Mapping]) -> pd.DataFrame:
    """Every run's effective-gradient ratio per step (arm, seed, step, value)."""
    return pd.concat(
        [
            pd.DataFrame(r["effective_gradient_ratio_per_step"]).assign(
                arm=r["arm"], seed=r["seed"]
            )
            for r in records
        ],
        ignore_index=True,
    )


class Stopwatch:
    """Wall seconds per named phase of the flow (to report its overhead)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def overhead(clock: Stopwatch, trained: list[dict]) -> dict[str, float]:
    """The flow's time outside its training runs (`train_seconds` of each trained run),
    absolute and as a share of the flow's wall time, and the phases it went to."""
    total = time.perf_counter() - clock.started
    # One after another, the runs' own seconds add up to less than the "runs" phase;
    # in parallel, the phase's wall time is the smaller: training took the lesser.
    training = min(
        sum(record["train_seconds"] for record in trained), clock.seconds.get("runs", 0.0)
    )
    return {
        "total_seconds": total,
        "training_seconds": training,
        "overhead_seconds": total - training,
        "overhead_share": (total - training) / total if total else 0.0,
    } | {f"{name}_seconds": seconds for name, seconds in clock.seconds.items()}
