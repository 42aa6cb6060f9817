"""Interrupting `make deploy-smoke` or `make run` leaves no process behind (issue 11.3).

Each case starts the make target in a new process group (like a shell job), waits for a
moment of the run (server starting, worker running, training), sends SIGINT or SIGTERM
to the whole group, and 30 s later counts the processes the run started that are still
alive. Two independent ways to find them: the launch mark inherited by every
descendant (`pipeline_lib.adapters.processes.LAUNCH_ENV`, set here before make starts), and any
new process whose command line or working directory lies in this test's temporary
folder (TMPDIR points there, so deploy-smoke's project copy does too).

    python -m pytest -m integration tests/integration/test_shutdown.py    # ~10-20 min on 2 cores
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline_lib.adapters.processes import LAUNCH_ENV
from tests.conftest import REPO_ROOT
from tests.smoke import deploy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SETTLE_S = 30.0  # the bound: nothing may be left this long after the signal
MOMENT_TIMEOUT_S = 900.0

# A tiny `make run`: HF generate, a few SFT and GRPO steps (the moment comes before the end).
TINY_RUN_PARAMS = deploy.TINY_OVERRIDES | {"train.steps": 6}


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def started_by_run(launch_id: str, folder: Path, before: set[int]) -> list[psutil.Process]:
    """Live processes that carry the launch mark, or that are new and run in `folder`."""
    found = []
    for process in psutil.process_iter():
        if process.pid in before or process.pid == os.getpid():
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            marked = launch_id in process.environ().get(LAUNCH_ENV, "").split(":")
            inside = str(folder) in _cmdline(process) or process.cwd().startswith(str(folder))
        except (psutil.Error, OSError):
            continue
        if marked or inside:
            found.append(process)
    return found


def wait_for_process(launch_id: str, pattern: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process in psutil.process_iter():
            try:
                if pattern in _cmdline(process) and launch_id in process.environ().get(
                    LAUNCH_ENV, ""
                ):
                    return
            except (psutil.Error, OSError):
                continue
        time.sleep(0.5)
    raise TimeoutError(f"no process matching {pattern!r} within {timeout_s:.0f} s")


def run_project(folder: Path) -> Path:
    """A copy of the project for `make run`, with the shared venv and tiny params."""
    env = deploy.base_env(folder) | {"PATH": os.environ["PATH"]}
    project = deploy.copy_project(folder / "project", env)
    for name in ("Makefile", "pyproject.toml", "requirements"):
        source = REPO_ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / name)
    (project / ".venv").symlink_to((REPO_ROOT / ".venv").resolve())
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in TINY_RUN_PARAMS.items():
        node = params
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


@contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """While it lasts, started children get SIGINT's default action even where this process
    ignores it: a shell's background job (`nohup pytest ... &`) inherits SIGINT = SIG_IGN,
    exec keeps an ignored signal ignored, and the SIGINT cases would then time out with
    nothing interrupted. A handler (not SIG_IGN) is reset to the default by exec."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)


def interrupt(
    target: str, moment: str, sig: signal.Signals, folder: Path
) -> tuple[list[str], float]:
    """Start `make target`, signal its process group at `moment`; (survivors, seconds to exit)."""
    launch_id = f"test-{uuid.uuid4().hex[:12]}"
    cwd = run_project(folder) if target == "run" else REPO_ROOT
    env = os.environ | {LAUNCH_ENV: launch_id, "TMPDIR": str(folder)}
    env.pop("PREFECT_API_URL", None)
    before = {p.pid for p in psutil.process_iter()}
    log = (folder / f"make-{target}.log").open("w")
    # STAMP= : the environment exists already; never (re)install from a test.
    with sigint_not_ignored():
        make = subprocess.Popen(
            ["make", target, "STAMP="],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    waits: dict[str, Callable[[], None]] = {
        "server starting": lambda: wait_for_process(launch_id, "server start", 120),
        "worker running": lambda: (
            wait_for_process(launch_id, "worker start", 300),
            time.sleep(3),
        ),
        "training": lambda: (
            wait_for_process(launch_id, "flows.train", MOMENT_TIMEOUT_S),
            time.sleep(10),
        ),
    }
    try:
        waits[moment]()
    except TimeoutError:
        os.killpg(make.pid, signal.SIGKILL)
        raise
    signalled = time.monotonic()
    os.killpg(make.pid, sig)
    try:
        make.wait(timeout=SETTLE_S * 2)
    except subprocess.TimeoutExpired:
        pass
    exit_s = time.monotonic() - signalled
    time.sleep(max(0.0, SETTLE_S - (time.monotonic() - signalled)))
    left = started_by_run(launch_id, folder, before)
    described = [f"{p.pid} {_cmdline(p)[:200]}" for p in left]
    for process in left:  # never leave them for the next case
        try:
            process.kill()
        except psutil.Error:
            pass
    log.close()
    return described, exit_s


CASES = [
    ("deploy-smoke", "server starting", signal.SIGINT),
    ("deploy-smoke", "worker running", signal.SIGTERM),
    ("deploy-smoke", "training", signal.SIGTERM),
    ("deploy-smoke", "training", signal.SIGINT),
    ("run", "server starting", signal.SIGTERM),
    ("run", "training", signal.SIGINT),
    ("run", "training", signal.SIGTERM),
]


@pytest.mark.parametrize(("target", "moment", "sig"), CASES)
def test_signal_to_the_make_process_group_leaves_nothing_running(
    target: str, moment: str, sig: signal.Signals, tmp_path: Path
) -> None:
    survivors, exit_s = interrupt(target, moment, sig, tmp_path)
    assert survivors == [], f"left running {SETTLE_S:.0f} s after {sig.name}: {survivors}"
    assert exit_s < SETTLE_S, f"make {target} took {exit_s:.0f} s to exit after {sig.name}"


if __name__ == "__main__":  # one pass over the cases, with a summary line (for reports)
    import tempfile

    failures = 0
    for case in CASES:
        with tempfile.TemporaryDirectory(prefix="knapsack-shutdown-") as tmp:
            started = time.monotonic()
            try:
                left, exit_s = interrupt(*case, Path(tmp))
                outcome = "ok" if not left else f"LEFT {left}"
            except Exception as error:  # noqa: BLE001 - report and go on
                left, exit_s, outcome = ["?"], float("nan"), f"ERROR {error}"
            failures += bool(left)
            print(
                f"make {case[0]} / {case[1]} / {case[2].name}: exit {exit_s:.1f} s after signal, "
                f"{outcome} ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    print(f"shutdown cases: {len(CASES) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)
