"""The whole pipeline as one flow (what Prefect deployments run): `dvc repro`, then push.

Runs the same DVC stages as `make run` (each stage flow shows up as its own flow
run on the same Prefect server), nested under one MLflow parent run, and, when
asked, pushes the DVC-tracked outputs so `dvc pull` at this commit restores them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.common import load_stage_config, run_flow_cli
from pipeline_lib.adapters.mlflow_runs import PARENT_ENV, find_or_create_parent, record_final_lock
from pipeline_lib.presets import load_preset
from tasks.storage import push_outputs, record_pushed_state


def dvc_command(overrides: dict[str, Any] | None) -> list[str]:
    """`dvc repro`, or `dvc exp run -S key=value ...` when parameters are overridden."""
    if not overrides:
        return ["dvc", "repro"]
    sets = [arg for key, value in overrides.items() for arg in ("-S", f"{key}={json.dumps(value)}")]
    return ["dvc", "exp", "run", *sets]


@flow(name="pipeline", log_prints=True)
def pipeline(
    params_path: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    push: bool = False,
    preset: str | None = None,
) -> dict:
    """prepare -> bootstrap -> train -> evaluate through DVC; optionally `dvc push` after.
    `preset` (presets/<name>.yaml) goes under `overrides`, which win over it."""
    if preset is not None:
        overrides = load_preset(preset) | (overrides or {})
    config = load_stage_config(params_path, overrides)  # fail on a bad override before compute
    logger = get_run_logger()
    env = os.environ | {PARENT_ENV: find_or_create_parent(config)}
    command = dvc_command(overrides)
    logger.info("running %s", " ".join(command))
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {result.returncode}")
    # The lock DVC wrote at the end pins every stage's outputs: into the MLflow runs.
    record_final_lock(config, parent=env[PARENT_ENV])
    if push:
        pushed = push_outputs()
        record_pushed_state(config, env[PARENT_ENV], pushed)
    summary_path = Path("metrics/summary.json")
    return json.loads(summary_path.read_text()) if summary_path.exists() else {}


if __name__ == "__main__":
    run_flow_cli(pipeline)
