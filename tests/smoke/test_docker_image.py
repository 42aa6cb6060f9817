"""The CPU image built here runs the pipeline deployment in a container of a Docker work pool.

What `make docker-smoke` runs (tests/smoke/docker_image.py), as one module fixture: a private
dockerd (docker.io and debootstrap installed with apt when missing), the local base image,
the CPU image built from docker/Dockerfile.cpu, Prefect, MLflow and SeaweedFS S3 servers
on the host, a Prefect Docker worker, and one tiny flow run in a container. Everything the
fixture started is stopped by PID before the assertions run; they check what was recorded.
Measured on a 2-core machine shared at load average 12-19: about 19 minutes from nothing
(apt, base image, a 5.4 GB image build, the flow run), 14 minutes with the cache of an
earlier run (KNAPSACK_RL_DOCKER_CACHE: base image and build cache reused); the report
with the timings is printed even under -q.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline_lib.adapters.processes import exit_on_sigterm
from tests.smoke import docker_image

pytestmark = [pytest.mark.docker, pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def smoke(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> docker_image.SmokeResult:
    if os.geteuid() != 0:
        pytest.skip("starting dockerd needs root")
    exit_on_sigterm()  # SIGTERM unwinds the smoke run's context managers: all stopped by PID
    result = docker_image.run_smoke(tmp_path_factory.mktemp("docker-smoke"))
    # The timings (base image, build, container) belong in CI's log, pass or fail.
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print("\n" + docker_image.report(result), flush=True)
    return result


def test_flow_run_in_a_container_of_the_cpu_image_completes(smoke):
    assert smoke.state == "Completed", f"{smoke.state}: {smoke.message}\n{smoke.logs}"
    container = smoke.container
    assert container, "no container was created for the flow run"
    assert container["image"] == docker_image.CPU_IMAGE
    assert container["network_mode"] == "host"
    assert container["exit_code"] == 0, container


def test_dvc_push_put_the_outputs_in_s3(smoke):
    assert smoke.s3_objects.get("dvc/", 0) > 0, f"nothing under s3://{docker_image.BUCKET}/dvc/"


def test_mlflow_server_has_the_runs_and_their_artifacts_are_in_s3(smoke):
    names = {run["name"]: run["status"] for run in smoke.mlflow_runs}
    assert any(name.startswith("pipeline-") for name in names), names
    for stage in ("prepare", "bootstrap", "evaluate"):
        assert names.get(stage) == "FINISHED", names
    # Proxied artifacts: the container wrote through MLflow, MLflow wrote to S3.
    assert smoke.s3_objects.get("mlflow/", 0) > 0, smoke.s3_objects


def test_everything_the_smoke_started_has_stopped(smoke):
    assert {"dockerd", "s3", "mlflow", "worker"} <= smoke.started_pids.keys()
    alive = {name: pid for name, pid in smoke.started_pids.items() if _running(pid)}
    assert not alive, f"still running: {alive}"


def _running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()
