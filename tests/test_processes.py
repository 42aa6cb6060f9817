"""pipeline_lib.adapters.processes: a launcher stops all it started, however it ends.

Each test runs a real launcher process (a Supervisor around a child in its own session
whose own child starts yet another session, like Prefect's worker -> flow run -> dvc),
ends it one way, and checks by PID that none of the processes it started is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from pipeline_lib.adapters.processes import LAUNCH_ENV, Supervisor, marked_processes

ROOT = Path(__file__).resolve().parents[1]

# Child in its own session; it starts a grandchild in another session (setsid) and sleeps.
SLEEPER = "import time; time.sleep(120)"
CHILD = textwrap.dedent(
    f"""
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", {SLEEPER!r}], start_new_session=True)
    time.sleep(120)
    """
)
LAUNCHER = textwrap.dedent(
    f"""
    import subprocess, sys, time
    from pipeline_lib.adapters.processes import Supervisor
    mode = sys.argv[1]
    with Supervisor(grace_s=2.0, watchdog=True) as supervisor:
        supervisor.popen([sys.executable, "-c", {CHILD!r}], start_new_session=True)
        # a child started without the supervisor (as a library would): found by its mark
        subprocess.Popen([sys.executable, "-c", {SLEEPER!r}], start_new_session=True)
        print(supervisor.launch_id, flush=True)
        time.sleep(2.0 if mode == "exit" else 120)
        if mode == "exit":
            raise SystemExit(3)
    """
)


def start_launcher(mode: str) -> tuple[subprocess.Popen, str]:
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, mode],
        cwd=ROOT,  # `python -c` puts the working directory first on the path
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, like a shell job
    )
    launch_id = launcher.stdout.readline().strip()
    assert launch_id, "launcher did not start"
    # wait until the grandchildren exist (3 marked processes besides the launcher)
    deadline = time.monotonic() + 30
    while len(marked_processes(launch_id, exclude=[launcher.pid])) < 3:
        assert time.monotonic() < deadline, "children did not start"
        time.sleep(0.1)
    return launcher, launch_id


def survivors(launch_id: str, within_s: float = 15.0) -> list[psutil.Process]:
    deadline = time.monotonic() + within_s
    while (left := marked_processes(launch_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in left:  # do not leave them behind for the next test
        process.kill()
    return left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_to_the_process_group_stops_children_in_other_sessions(sig):
    launcher, launch_id = start_launcher("wait")
    os.killpg(launcher.pid, sig)
    assert launcher.wait(timeout=30) == 128 + sig
    assert survivors(launch_id) == []


def test_normal_exit_stops_children_in_other_sessions():
    launcher, launch_id = start_launcher("exit")
    assert launcher.wait(timeout=30) == 3
    assert survivors(launch_id) == []


def test_sigkill_of_the_launcher_is_cleaned_up_by_the_watchdog():
    launcher, launch_id = start_launcher("wait")
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=10)
    assert survivors(launch_id, within_s=25) == []


def test_nested_launch_marks_keep_the_outer_id(monkeypatch):
    monkeypatch.setenv(LAUNCH_ENV, "outer")
    supervisor = Supervisor(mark_environment=False)
    assert supervisor.env({})[LAUNCH_ENV] == f"outer:{supervisor.launch_id}"
