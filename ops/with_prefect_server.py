"""Run a command against a local Prefect server started for it, then stop the server.

    python -m ops.with_prefect_server -- dvc repro

Every DVC stage is a separate process; without a server each would start Prefect's
temporary one (15-40 s apiece). This starts one on 127.0.0.1 (a free port, state in
PREFECT_HOME, so the flow runs stay browsable with `prefect server start`), points
PREFECT_API_URL at it for the command, and stops it afterwards.

Clean shutdown: a `pipeline_lib.adapters.processes.Supervisor` marks every process started
below this one (the server in its own session, `dvc`, the stages, vLLM's engine
core) and stops all of them on normal or failed exit, on Ctrl-C (SIGINT to the
foreground process group), on SIGTERM or SIGHUP, and through a watchdog process
after a SIGKILL of this script.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# This checkout's library, not whatever copy the environment has installed.
from pipeline_lib.adapters.processes import Supervisor


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Prefect server exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {url} not healthy after {timeout_s:.0f} s")


def stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group (uvicorn workers included), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextmanager
def prefect_server(
    timeout_s: float = 180.0,
    env: Mapping[str, str] | None = None,
    supervisor: Supervisor | None = None,
) -> Iterator[str]:
    """Start `prefect server start` on loopback; yield its API URL; stop it on exit.

    `env` replaces the inherited environment (e.g. to give the server its own PREFECT_HOME).
    With a `supervisor`, the server carries its launch mark and is tracked by it, so an
    interrupted launcher stops it too.
    """
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ if env is None else env) | {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        # The UI's pages call this API, not Prefect's default port 4200: the "View at"
        # links in the stage logs work while the run lasts.
        "PREFECT_UI_API_URL": api_url,
    }
    launch = supervisor.popen if supervisor is not None else subprocess.Popen
    process = launch(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so stop() reaches its children
    )
    try:
        wait_healthy(api_url, process, timeout_s)
        print(f"Prefect server (pid {process.pid}) on {api_url}", file=sys.stderr)
        yield api_url
    finally:
        stop(process)


def main(argv: list[str]) -> int:
    if "--" in argv:
        argv = argv[argv.index("--") + 1 :]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    with Supervisor(watchdog=True) as supervisor:
        if os.environ.get("PREFECT_API_URL"):  # a server is already configured: use it
            return supervisor.popen(argv).wait()
        with prefect_server(supervisor=supervisor) as api_url:
            # In this process group: Ctrl-C in the terminal reaches the command directly.
            command = supervisor.popen(argv, env=os.environ | {"PREFECT_API_URL": api_url})
            return command.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
