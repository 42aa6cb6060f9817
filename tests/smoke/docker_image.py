"""The CPU image runs a pipeline deployment to Completed on a Docker work pool.

Helpers of tests/smoke/test_docker_image.py (what `make docker-smoke` runs, as root), also
used by the stack and GPU-image smoke tests. `run_smoke()` does, each step stopped by PID
when the run ends, fails or is interrupted (Ctrl-C, SIGTERM):
1. its own `dockerd` (ops/docker_engine.py; docker.io and debootstrap are installed
   with apt when missing), data root in a stable cache folder (KNAPSACK_RL_DOCKER_CACHE,
   default /var/cache/knapsack-rl-docker), so images and the build cache survive;
2. the local base image (debootstrap bookworm), made once and then reused;
3. `docker build` of docker/Dockerfile.cpu from local sources (that base, uv from PyPI,
   torch from /opt/wheels staged into docker/local/, the host's CA bundle): the project
   installed in `knapsack-rl-cpu:local`; a rebuild after a code change redoes only the
   last layers;
4. on the host, on 127.0.0.1: a Prefect server, a SeaweedFS S3 server (bucket
   `knapsack-rl-smoke`) and an MLflow server (sqlite; artifacts proxied to S3);
5. a copy of the project as a git repository with a DVC remote on that bucket, a Docker
   work pool and a Prefect Docker worker (prefect-docker) on the host, and the deployment
   `pipeline/docker-smoke`: each flow run is a container of the image on the host
   network that clones the project (like the `gpu-docker` deployment), runs a tiny
   pipeline (`dvc exp run` with small overrides), logs to MLflow and `dvc push`es;
6. one flow run; the result holds its final state, the objects it put in S3 and its
   MLflow runs, filled in before anything is stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ops.docker_engine import (
    BASE_IMAGE,
    DEFAULT_CACHE_DIR,
    DockerEngine,
    ensure_base_image,
    log,
    running_dockerd,
)
from ops.with_prefect_server import free_port, prefect_server, stop
from tests.integration.s3_server import S3Server, make_bucket, running_s3_server
from tests.smoke import deploy
from tests.smoke.deploy import REPO_ROOT

CPU_IMAGE = "knapsack-rl-cpu:local"
POOL = "docker-smoke"
DEPLOYMENT = "pipeline/docker-smoke"
BUCKET = "knapsack-rl-smoke"
SMOKE_LABEL = "io.knapsack-rl.docker-smoke"
SERVER_START_TIMEOUT_S = 600.0  # the MLflow and Prefect servers, on a possibly busy machine
LOCAL_INPUTS = REPO_ROOT / "docker" / "local"  # git- and docker-ignored except by design
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
WHEEL_DIRS = ("/opt/wheels",)
CA_BUNDLE = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
# Where the project is mounted in the flow-run container, read-only, to be cloned from.
REPO_IN_CONTAINER = "/srv/knapsack-rl.git"
# MLflow artifacts go through the tracking server (proxied to S3): the container needs only
# the MLflow URL for them. params.yaml's default (a local `mlruns`) would stay in the container.
SMOKE_OVERRIDES: dict[str, Any] = deploy.TINY_OVERRIDES | {
    "tracking.artifact_location": "mlflow-artifacts:/knapsack-rl",
}


@dataclass
class SmokeResult:
    """What one smoke run did and measured; filled in before anything is stopped."""

    flow_run_id: str = ""
    state: str = "not run"
    message: str = ""
    base_image_s: float = 0.0  # 0 when the base image was already there
    build_s: float = 0.0
    image_mb: float = 0.0
    container: dict[str, Any] = field(default_factory=dict)  # image, exit code, times
    flow_run_s: float | None = None  # the flow run's start to end, as Prefect saw it
    s3_objects: dict[str, int] = field(default_factory=dict)  # prefix -> object count
    mlflow_runs: list[dict[str, str]] = field(default_factory=list)
    logs: str = ""  # the flow run's logs (when not Completed)
    started_pids: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.state == "Completed"
            and self.s3_objects.get("dvc/", 0) > 0
            and any(r["status"] == "FINISHED" for r in self.mlflow_runs)
        )


def clone_steps(repository: str) -> list[dict[str, Any]]:
    """A deployment's pull steps: clone `repository` per flow run and work in the clone."""
    return [
        {"prefect.deployments.steps.git_clone": {"id": "clone", "repository": repository}},
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ clone.directory }}"}},
    ]


def stage_local_inputs(target: Path = LOCAL_INPUTS) -> None:
    """Put torch's CPU wheel (hard link) and the host's CA bundle into docker/local/."""
    wheels = target / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for folder in (*WHEEL_DIRS, *os.environ.get("PIP_FIND_LINKS", "").split()):
        source = Path(folder) / TORCH_WHEEL
        if source.exists():
            if not (wheels / TORCH_WHEEL).exists():
                try:
                    os.link(source, wheels / TORCH_WHEEL)
                except OSError:
                    shutil.copy2(source, wheels / TORCH_WHEEL)
            break
    else:
        raise FileNotFoundError(f"{TORCH_WHEEL} not found in {WHEEL_DIRS}")
    if CA_BUNDLE.exists():
        shutil.copy2(CA_BUNDLE, target / "ca-certificates.crt")


def build_cpu_image(engine: DockerEngine, log_path: Path, image: str = CPU_IMAGE) -> float:
    """docker build of Dockerfile.cpu from local sources; seconds it took."""
    stage_local_inputs()
    args = [
        "build",
        "--network",
        "host",
        "--progress",
        "plain",
        "-f",
        "docker/Dockerfile.cpu",
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "--build-arg",
        "UV_SOURCE=pypi",
        "--build-arg",
        "TORCH_INDEX_URL=",
        "-t",
        image,
        ".",
    ]
    log(f"building {image} (log {log_path})")
    started = time.monotonic()
    with log_path.open("w") as out:
        result = subprocess.run(
            ["/usr/bin/docker", *args],
            cwd=REPO_ROOT,
            env=os.environ | engine.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=3600,
        )
    spent = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"docker build failed ({result.returncode}):\n"
            + log_path.read_text(errors="replace")[-4000:]
        )
    log(f"built {image} ({engine.image_size_mb(image):.0f} MB) in {spent:.0f} s")
    return spent


def wait_http_ok(url: str, process: subprocess.Popen, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{what} at {url} not ready after {timeout_s:.0f} s (see its log)")


@contextmanager
def mlflow_server(
    workdir: Path, s3: S3Server, env: Mapping[str, str], pids: dict[str, int]
) -> Iterator[str]:
    """`mlflow server` on loopback: sqlite store, artifacts proxied to s3://BUCKET/mlflow."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_env = dict(env) | s3.env | {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url}
    log_file = (workdir / "mlflow.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{BUCKET}/mlflow",
            "--serve-artifacts",
            "--workers",
            "1",
        ],
        env=server_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log_file.close()
    pids["mlflow"] = process.pid
    try:
        # Its imports and migrations take 10-20 s on an idle 2-core machine, minutes on a busy one.
        wait_http_ok(f"{url}/health", process, "MLflow server", SERVER_START_TIMEOUT_S)
        log(f"MLflow server (pid {process.pid}) on {url}")
        yield url
    finally:
        stop(process)


@contextmanager
def docker_worker(
    project: Path, env: Mapping[str, str], log_path: Path, pids: dict[str, int]
) -> Iterator[subprocess.Popen]:
    """A Prefect worker of type docker on POOL, in its own process group."""
    deploy.run_cli(
        ["prefect", "--no-prompt", "work-pool", "create", POOL, "--type", "docker", "--overwrite"],
        project,
        env,
    )
    with log_path.open("w") as out:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                POOL,
                "--type",
                "docker",
                "--name",
                "docker-smoke",
            ],
            cwd=project,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pids["worker"] = worker.pid
    log(f"Docker worker (pid {worker.pid}) on pool {POOL}, log {log_path}")
    try:
        yield worker
    finally:
        stop(worker)


def deployment_file(path: Path, env: Mapping[str, str], repo: Path) -> Path:
    """A prefect.yaml with the one deployment of this smoke test (the project's is untouched)."""
    job_env = {
        name: env[name]
        for name in (
            "MLFLOW_TRACKING_URI",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
        )
    }
    # The worker hands its own Prefect settings to the container; PREFECT_HOME is the host's.
    job_env |= {"HF_HUB_OFFLINE": "1", "PREFECT_HOME": "/home/knapsack/.prefect"}
    spec = {
        "name": "knapsack-rl-docker-smoke",
        "prefect-version": "3.9.1",
        "build": None,
        "push": None,
        "pull": None,
        "deployments": [
            {
                "name": DEPLOYMENT.split("/")[1],
                "entrypoint": "flows/pipeline.py:pipeline",
                "parameters": {"params_path": "params.yaml", "overrides": None, "push": True},
                "work_pool": {
                    "name": POOL,
                    "job_variables": {
                        "image": CPU_IMAGE,
                        "image_pull_policy": "Never",  # no registry: the image is local
                        "network_mode": "host",  # no bridge; the servers are on 127.0.0.1
                        "auto_remove": False,  # inspected, then removed by the smoke run
                        "volumes": [f"{repo}:{REPO_IN_CONTAINER}:ro"],
                        "labels": {SMOKE_LABEL: "1"},
                        "env": job_env,
                    },
                },
                # Like the gpu-docker deployment: a fresh clone per flow run.
                "pull": clone_steps(REPO_IN_CONTAINER),
            }
        ],
    }
    path.write_text(json.dumps(spec, indent=2))  # JSON is YAML
    return path


def prepare_project(workdir: Path, env: dict[str, str], s3: S3Server) -> tuple[Path, Path]:
    """Project copy (git + DVC, remote on the smoke bucket) and a bare clone for containers."""
    project = deploy.copy_project(workdir / "project", env)
    deploy.run_cli(
        [
            sys.executable,
            "-m",
            "ops.setup_s3_remote",
            f"s3://{BUCKET}/dvc",
            "--endpoint-url",
            s3.endpoint_url,
            "--create-bucket",
        ],
        project,
        env,
    )
    deploy.run_cli(["git", "add", "-A"], project, env)
    deploy.run_cli(["git", "commit", "-q", "-m", "DVC remote on the smoke bucket"], project, env)
    repo = workdir / "knapsack-rl.git"
    deploy.run_cli(["git", "clone", "-q", "--bare", str(project), str(repo)], workdir, env)
    # The container runs as uid 1000; git refuses repositories owned by someone else.
    subprocess.run(["chown", "-R", "1000:1000", str(repo)], check=True)
    return project, repo


def inspect_container(engine: DockerEngine, flow_run_id: str) -> dict[str, Any]:
    """The flow run's container: image, exit code, start and finish times, seconds run."""
    ids = engine.docker(
        "ps",
        "-aq",
        "--filter",
        f"label={SMOKE_LABEL}",
        "--filter",
        f"label=io.prefect.flow-run-id={flow_run_id}",
    ).stdout.split()
    if not ids:
        return {}
    info = json.loads(engine.docker("inspect", ids[0]).stdout)[0]
    state = info["State"]
    started, finished = (_parse_time(state[k]) for k in ("StartedAt", "FinishedAt"))
    return {
        "id": ids[0][:12],
        "image": info["Config"]["Image"],
        "network_mode": info["HostConfig"]["NetworkMode"],
        "exit_code": state["ExitCode"],
        "started_at": state["StartedAt"],
        "finished_at": state["FinishedAt"],
        "run_s": (finished - started).total_seconds() if started and finished else None,
    }


def _parse_time(stamp: str) -> datetime | None:
    if not stamp or stamp.startswith("0001"):
        return None
    # Docker gives nanoseconds; fromisoformat takes at most microseconds.
    head, _, rest = stamp.partition(".")
    fraction = "".join(ch for ch in rest if ch.isdigit())[:6]
    return datetime.fromisoformat(f"{head}.{fraction or '0'}+00:00")


def s3_object_counts(
    s3: S3Server, prefixes: tuple[str, ...] = ("dvc/", "mlflow/")
) -> dict[str, int]:
    client = s3.client()
    counts = {}
    for prefix in prefixes:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        counts[prefix] = sum(len(page.get("Contents", [])) for page in pages)
    return counts


def mlflow_runs(tracking_uri: str, experiment: str = "knapsack-rl") -> list[dict[str, str]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=100)
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name or "",
            "status": r.info.status,
            "artifact_uri": r.info.artifact_uri or "",
        }
        for r in runs
    ]


def flow_run_seconds(stack: deploy.Stack, flow_run_id: str) -> float | None:
    inspected = json.loads(
        deploy.run_cli(
            ["prefect", "flow-run", "inspect", flow_run_id, "--output", "json"],
            stack.project,
            stack.env,
        )
    )
    return inspected.get("total_run_time")


def remove_smoke_containers(engine: DockerEngine) -> None:
    ids = engine.docker("ps", "-aq", "--filter", f"label={SMOKE_LABEL}", check=False).stdout
    if ids.split():
        engine.docker("rm", "-f", *ids.split(), check=False)


def run_smoke(
    workdir: Path, cache_dir: Path = DEFAULT_CACHE_DIR, timeout_s: float = 1500
) -> SmokeResult:
    """Everything above; the result is complete before anything is stopped."""
    result = SmokeResult()
    with ExitStack() as stack:
        engine = stack.enter_context(running_dockerd(cache_dir))
        result.started_pids["dockerd"] = engine.pid
        stack.callback(remove_smoke_containers, engine)
        remove_smoke_containers(engine)  # an interrupted earlier run's
        result.base_image_s = ensure_base_image(engine, cache_dir)
        result.build_s = build_cpu_image(engine, workdir / "build.log")
        result.image_mb = engine.image_size_mb(CPU_IMAGE)

        env = deploy.base_env(workdir) | engine.env
        s3 = stack.enter_context(running_s3_server(workdir / "s3"))
        result.started_pids["s3"] = s3.process.pid
        log(f"SeaweedFS S3 (pid {s3.process.pid}) on {s3.endpoint_url}")
        make_bucket(s3, BUCKET)
        env |= s3.env
        env["MLFLOW_TRACKING_URI"] = stack.enter_context(
            mlflow_server(workdir, s3, env, result.started_pids)
        )
        project, repo = prepare_project(workdir, env, s3)
        env["PREFECT_API_URL"] = stack.enter_context(
            prefect_server(timeout_s=SERVER_START_TIMEOUT_S, env=env)
        )
        env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
        stack.enter_context(
            docker_worker(project, env, workdir / "worker.log", result.started_pids)
        )
        prefect_file = deployment_file(workdir / "prefect-docker-smoke.yaml", env, repo)
        deploy.run_cli(
            [
                "prefect",
                "--no-prompt",
                "deploy",
                "--prefect-file",
                str(prefect_file),
                "--name",
                DEPLOYMENT.split("/")[1],
            ],
            project,
            env,
        )
        smoke_stack = deploy.Stack(project=project, env=env, worker_log=workdir / "worker.log")
        log(f"running {DEPLOYMENT} (a container of {CPU_IMAGE}; about 3-6 minutes)")
        run = deploy.run_deployment(
            smoke_stack,
            {"overrides": SMOKE_OVERRIDES, "push": True},
            deployment=DEPLOYMENT,
            timeout_s=timeout_s,
        )
        result.flow_run_id, result.state, result.message = run.flow_run_id, run.state, run.message
        result.container = inspect_container(engine, run.flow_run_id)
        result.flow_run_s = flow_run_seconds(smoke_stack, run.flow_run_id)
        result.s3_objects = s3_object_counts(s3)
        result.mlflow_runs = mlflow_runs(env["MLFLOW_TRACKING_URI"])
        if run.state != "Completed":
            result.logs = (
                run.output[-3000:]
                + "\n"
                + deploy.flow_run_logs(smoke_stack, run.flow_run_id)[-6000:]
                + "\nworker log:\n"
                + (workdir / "worker.log").read_text(errors="replace")[-6000:]
            )
    return result


def report_build(result: SmokeResult) -> str:
    return (
        f"base image: {'reused' if not result.base_image_s else f'{result.base_image_s:.0f} s'}\n"
        f"build of {CPU_IMAGE}: {result.build_s:.0f} s, image {result.image_mb:.0f} MB"
    )


def report(result: SmokeResult) -> str:
    lines = [
        report_build(result),
        f"container: {json.dumps(result.container)}",
        f"flow run time (Prefect): {result.flow_run_s}",
        f"S3 objects in s3://{BUCKET}: {result.s3_objects}",
        "MLflow runs: " + ", ".join(f"{r['name']} {r['status']}" for r in result.mlflow_runs),
        f"flow run {result.flow_run_id}: {result.state}"
        + (f" ({result.message})" if result.message else ""),
    ]
    return "\n".join(lines)
