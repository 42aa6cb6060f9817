"""The `local` Prefect deployment end to end: a real server and process worker, `prefect deploy`,
`prefect deployment run --watch`, on a temporary project copy (tests/smoke/deploy.py).

`make deploy-smoke` runs the tiny pipeline run alone (`-s`: it prints the final state),
`test_tiny_pipeline_run_completes_and_writes_the_summary`.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator

import pytest

from pipeline_lib.adapters.processes import Supervisor
from tests.smoke import deploy

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[deploy.Stack]:
    """The stack, stopped by PID at the end, on SIGTERM or SIGHUP, and (the watchdog's
    job) after a SIGKILL of pytest; Ctrl-C unwinds through the fixture's teardown."""
    with Supervisor(
        watchdog=True,
        signals=(signal.SIGTERM, signal.SIGHUP),
        mark_environment=False,
        kill_descendants=False,
    ) as supervisor:
        workdir = tmp_path_factory.mktemp("deploy")
        with deploy.deployment_stack(workdir, supervisor) as stack:
            yield stack


def test_bad_override_key_fails_the_flow_run_before_compute_naming_the_key(stack):
    result = deploy.run_deployment(stack, {"overrides": {"train.stepz": 2}}, timeout_s=300)
    assert result.state == "Failed", result.output[-2000:]
    assert "unknown key 'train.stepz'" in result.message, result.message
    print(f"state message: {result.message}")
    logs = deploy.flow_run_logs(stack, result.flow_run_id)
    assert "unknown key 'train.stepz'" in logs
    # Failed before any compute: the flow never got as far as starting DVC.
    assert "running dvc" not in logs


def test_wrongly_typed_overrides_are_refused_before_a_run_is_created(stack):
    with pytest.raises(RuntimeError, match="no flow run was created") as refused:
        deploy.run_deployment(stack, {"overrides": "train.steps=2"}, timeout_s=120)
    assert "overrides" in str(refused.value), str(refused.value)


def test_tiny_pipeline_run_completes_and_writes_the_summary(stack):
    result = deploy.run_deployment(stack, {"overrides": deploy.TINY_OVERRIDES})
    summary_path = stack.project / "metrics" / "summary.json"
    if summary_path.exists():  # what `make deploy-smoke` shows (pytest -s)
        print(f"\nmetrics/summary.json: {summary_path.read_text().strip()}")
    print(
        f"flow run {result.flow_run_id}: {result.state}"
        + (f" ({result.message})" if result.message else "")
    )
    if result.state != "Completed":
        logs = deploy.flow_run_logs(stack, result.flow_run_id)[-4000:]
        print(f"{logs}\nworker log: {stack.worker_log}", file=sys.stderr)
    assert result.state == "Completed", result.output[-3000:] + result.message
    summary = json.loads(summary_path.read_text())
    assert {"start_accuracy", "knapsack_accuracy", "uniform_accuracy"} <= summary.keys()
    # The overrides reached the stages through `dvc exp run -S`.
    params = (stack.project / "params.yaml").read_text()
    assert "steps: 2" in params and "backend: hf" in params


COMPARE_DEPLOYMENT = "compare-run/compare-local"


def test_compare_sends_each_arm_and_seed_to_the_compare_deployment(stack):
    """`compare.deployment` set: the compare flow (here, in the project) starts one flow run
    of `compare-run/compare-local` per arm x seed with run_deployment; the process worker
    runs them and their records come back as the flow runs' results."""
    tiny = {**deploy.TINY_OVERRIDES, "compare.arms": ["knapsack", "uniform"]}
    tiny |= {"compare.seeds": [0], "compare.steps": 2, "compare.deployment": COMPARE_DEPLOYMENT}
    flags = [arg for key, value in tiny.items() for arg in ("-S", f"{key}={json.dumps(value)}")]
    python = [sys.executable, "-m"]
    for stage in ("flows.prepare", "flows.bootstrap"):  # the comparison's start policy and data
        deploy.run_cli([*python, stage, *flags], stack.project, stack.env, timeout_s=600)
    deploy.run_cli(
        ["prefect", "--no-prompt", "deploy", "--name", COMPARE_DEPLOYMENT.split("/")[1]],
        stack.project,
        stack.env,
    )
    output = deploy.run_cli(
        [*python, "flows.compare", *flags], stack.project, stack.env, timeout_s=900
    )
    assert "0 runs reused, 2 to train" in output, output[-3000:]
    summary = json.loads((stack.project / "metrics" / "compare.json").read_text())
    assert set(summary["arms"]) == {"knapsack", "uniform"}
    records = sorted((stack.project / "outputs/compare/runs").glob("*/record.json"))
    assert len(records) == 2
    runs = json.loads(
        deploy.run_cli(
            ["prefect", "flow-run", "ls", "--flow-name", "compare-run", "--output", "json"],
            stack.project,
            stack.env,
        )
    )
    finished = {run["name"]: run["state"]["type"] for run in runs}
    assert finished == {
        "compare-knapsack-seed0": "COMPLETED",
        "compare-uniform-seed0": "COMPLETED",
    }, finished
