"""A real `mlflow server` (sqlite store) stopped for 30 s mid-training: training goes on,
metrics are buffered and all arrive after it is back."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline_lib.adapters.processes import Supervisor
from tests.faults.harness import (
    events,
    finish,
    free_port,
    start_worker,
    stop_server,
    wait_for_event,
)

pytestmark = pytest.mark.faults

OUTAGE_S = 30.0
STEPS = 12
CHECKED_METRICS = ("train/loss", "rollout/effective_gradient_ratio", "alloc/mean_rollouts")


def start_mlflow_server(supervisor: Supervisor, workdir: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on loopback in its own session, once its /health answers."""
    uri = f"http://127.0.0.1:{port}"
    args = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--default-artifact-root", str(workdir / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = dict(os.environ) | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    log = (workdir / "server.log").open("a")
    server = supervisor.popen(
        args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{uri}/health", timeout=2):
            return server
        time.sleep(0.5)
    raise TimeoutError("mlflow server did not start")


def missing_metrics(uri: str, run_id: str, steps_csv: Path) -> list[str]:
    """`metric@step` of CHECKED_METRICS that MLflow lacks or holds with another value."""
    import pandas as pd
    from mlflow import MlflowClient

    steps_table = pd.read_csv(steps_csv)
    client = MlflowClient(uri)
    missing = []
    for key in CHECKED_METRICS:
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        for _, row in steps_table[steps_table.step > 0].iterrows():
            if int(row.step) not in logged or logged[int(row.step)] != float(row[key]):
                missing.append(f"{key}@{int(row.step)}")
    return missing


def test_mlflow_outage_buffers_metrics_until_the_server_is_back(
    supervisor: Supervisor, fault_root: Path, record_property
):
    from mlflow import MlflowClient

    workdir = fault_root / "mlflow-outage"
    workdir.mkdir(parents=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(supervisor, workdir, port)
    worker_env = dict(os.environ) | {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # one attempt per call: fail fast, buffer
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    }
    worker = start_worker(
        supervisor, workdir, steps=STEPS, tracking_uri=uri, step_sleep_s=2.0, env=worker_env
    )
    wait_for_event(worker, workdir, "saved 2")
    stop_server(server)
    down_at, done_before = time.monotonic(), len(events(workdir))
    time.sleep(OUTAGE_S)
    progressed = sum(1 for line in events(workdir)[done_before:] if line.startswith("saved"))
    server = start_mlflow_server(supervisor, workdir, port)
    finish(worker, workdir)
    down_s = time.monotonic() - down_at
    run_id = (workdir / "run_id").read_text()
    missing = missing_metrics(uri, run_id, workdir / "final/steps.csv")
    status = MlflowClient(uri).get_run(run_id).info.status
    stop_server(server)
    problems = []
    if progressed < 2:
        problems.append(f"only {progressed} steps completed during the outage")
    if missing:
        problems.append(f"metrics missing or different in MLflow: {missing[:5]}")
    if status != "FINISHED":
        problems.append(f"run status {status}")
    assert not problems, "; ".join(problems)
    record_property(
        "detail",
        f"server down {OUTAGE_S:.0f} s (worker {down_s:.0f} s without it); {progressed} steps "
        f"trained meanwhile; all {STEPS} steps x 3 checked metrics in MLflow, run FINISHED",
    )
