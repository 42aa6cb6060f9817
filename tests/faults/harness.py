"""What the fault trials share: the train worker's process, its event log, run comparisons.

The training trials run `tests.faults.train_worker` in a subprocess started through a
`Supervisor` (stopped by PID), and read the event lines it appends per rollout call and
per checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline_lib.adapters.processes import Supervisor
from pipeline_lib.training.compute import is_wall_clock

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 1  # training seed: rollout calls use seed 100003 + step, evaluations seed 1
ROLLOUT_SEED_BASE = SEED * 100_003
TRAIN_STEPS = 6
KILL_STEP_SLEEP_S = 1.0  # extra seconds per rollout call in the kill trials
FINGERPRINT = "fault-trials"


def start_worker(
    supervisor: Supervisor,
    workdir: Path,
    *,
    steps: int = TRAIN_STEPS,
    tracking_uri: str | None = None,
    step_sleep_s: float = 0.0,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start one attempt of the small training run in `workdir`, logging to worker.log."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "tests.faults.train_worker", str(workdir), "--steps", str(steps)]
    args += ["--tracking-uri", tracking_uri] if tracking_uri else []
    args += ["--step-sleep", str(step_sleep_s)] if step_sleep_s else []
    log = (workdir / "worker.log").open("a")
    return supervisor.popen(
        args, cwd=REPO_ROOT, env=env or dict(os.environ), stdout=log, stderr=subprocess.STDOUT
    )


def events(workdir: Path) -> list[str]:
    path = workdir / "events.log"
    return path.read_text().splitlines() if path.exists() else []


def wait_for_event(
    process: subprocess.Popen, workdir: Path, wanted: str, timeout_s: float = 900
) -> bool:
    """Poll the event log until `wanted` appears; False if the worker ended first.

    On timeout the worker is killed (a failed trial must not load the next ones).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if wanted in events(workdir):
            return True
        if process.poll() is not None:
            return wanted in events(workdir)
        time.sleep(0.01)
    process.kill()
    process.wait()
    raise TimeoutError(f"no {wanted!r} event within {timeout_s:.0f} s ({workdir})")


def finish(process: subprocess.Popen, workdir: Path, timeout_s: float = 600) -> None:
    """Wait for the worker; raise with the tail of its log if it failed."""
    code = process.wait(timeout=timeout_s)
    if code != 0:
        tail = (workdir / "worker.log").read_text()[-2000:]
        raise RuntimeError(f"train worker exited with {code}:\n{tail}")


def repeated_completed_rollouts(lines: list[str]) -> list[str]:
    """`gen s` events that came after a checkpoint holding step s (a completed step redone)."""
    saved, bad = 0, []
    for line in lines:
        kind, _, value = line.partition(" ")
        if kind == "saved":
            saved = max(saved, int(value))
        elif kind == "gen" and int(value) < saved:
            bad.append(f"step {int(value) + 1} rolled out again after checkpoint {saved}")
    return bad


def compare_runs(run: Path, reference: Path) -> list[str]:
    """Differences between two finished runs' weights, status tables and metrics."""
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    problems = []
    a, b = (
        load_file(run / "final/model.safetensors"),
        load_file(reference / "final/model.safetensors"),
    )
    differing = [name for name in b if not torch.equal(a[name], b[name])]
    if differing or a.keys() != b.keys():
        problems.append(f"weights differ: {differing[:3]}")
    try:
        pd.testing.assert_frame_equal(
            pd.read_parquet(run / "final/status.parquet"),
            pd.read_parquet(reference / "final/status.parquet"),
            check_exact=True,
        )
    except AssertionError as error:
        problems.append(f"status differs: {str(error)[:200]}")
    steps_a, steps_b = (pd.read_csv(p / "final/steps.csv") for p in (run, reference))
    keep = [c for c in steps_b.columns if not is_wall_clock(c)]
    try:
        pd.testing.assert_frame_equal(steps_a[keep], steps_b[keep], check_exact=True)
    except (AssertionError, KeyError) as error:
        problems.append(f"metrics differ: {str(error)[:200]}")
    return problems


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def stop_server(server: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the server's process group; SIGKILL it if it is still there after `grace_s`."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kill_moments(count: int, seed: int = 0) -> list[tuple[str, float]]:
    """`count` (event, delay) pairs: a rollout call or a checkpoint write, 0-0.6 s after it."""
    rng = random.Random(seed)
    targets = [f"gen {s}" for s in range(TRAIN_STEPS)]
    targets += [f"saving {s}" for s in range(1, TRAIN_STEPS)]
    return [(rng.choice(targets), rng.uniform(0.0, 0.6)) for _ in range(count)]


def kill_and_resume(
    supervisor: Supervisor, workdir: Path, reference: Path, target: str, delay_s: float
) -> tuple[list[str], str]:
    """Start a run, SIGKILL it `delay_s` after event `target`, resume it, compare it.

    Returns the problems found (none: the trial passes) and what happened.
    """
    from pipeline_lib.training import DirectoryCheckpointer

    # Each rollout call sleeps KILL_STEP_SLEEP_S (results are unchanged), so that on a busy
    # machine the kill still lands near `target` and not after the run's last step.
    worker = start_worker(supervisor, workdir, step_sleep_s=KILL_STEP_SLEEP_S)
    reached = wait_for_event(worker, workdir, target)
    time.sleep(delay_s)
    killed = worker.poll() is None
    if killed:
        os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    before_kill = events(workdir)[-1]  # where the kill really landed
    staging = [p.name for p in (workdir / "state").glob(".checkpoint.*")]
    saved = DirectoryCheckpointer(workdir / "state", FINGERPRINT).saved_step()
    finish(start_worker(supervisor, workdir, step_sleep_s=KILL_STEP_SLEEP_S), workdir)
    lines = events(workdir)
    problems = compare_runs(workdir, reference) + repeated_completed_rollouts(lines)
    if not killed or not reached:
        problems.append(f"the run ended before the kill ({target} + {delay_s:.2f} s)")
    redone = sum(1 for line in lines if line.startswith("gen")) - TRAIN_STEPS
    detail = (
        f"killed {delay_s:.2f} s after '{target}' (last event '{before_kill}'), "
        f"checkpoint at step {saved}"
        f"{', mid-write ' + str(staging) if staging else ''}; resumed run equals the "
        f"uninterrupted one; {redone} uncompleted step(s) rolled out again, 0 completed"
    )
    return problems, detail
