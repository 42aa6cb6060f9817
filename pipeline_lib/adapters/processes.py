"""Stop everything a launcher started: on normal exit, on an error, on Ctrl-C and on SIGTERM.

A launcher (ops/with_prefect_server.py, the deployment smoke test, a test fixture)
opens a `Supervisor`. It marks its environment with a launch id: the variable
`LAUNCH_ENV` holds the ids of every enclosing launcher, colon-separated, and every
process started below it inherits it, also those that start their own session
(Prefect's server, worker and flow runs, `dvc`, the stage's python, vLLM's engine
core) and those re-parented to init when their parent died. `shutdown()` finds them
all by that mark in /proc/<pid>/environ (plus the process groups it started and its
own descendants), sends SIGTERM, waits a grace period, then SIGKILLs what is left,
scanning again until nothing is found, so a worker that starts a flow run during
the shutdown does not get away.

`Supervisor.__enter__` installs SIGINT/SIGTERM/SIGHUP handlers (main thread only)
that ignore further signals, run the shutdown, and raise SystemExit(128 + signal),
so `finally` blocks still run; `atexit` covers other exits. A SIGKILL of the
launcher itself cannot be caught: `watchdog=True` starts a small process in its own
session that waits for the launcher to die and then runs the same sweep.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any

import psutil

LAUNCH_ENV = "KNAPSACK_RL_LAUNCH_ID"
"""Colon-separated launch ids of every enclosing `Supervisor`, inherited by all descendants."""

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def marked_processes(launch_id: str, *, exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """Live processes whose initial environment carries `launch_id` in `LAUNCH_ENV`."""
    skip = set(exclude) | {os.getpid()}
    found = []
    for process in psutil.process_iter():
        if process.pid in skip:
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            value = process.environ().get(LAUNCH_ENV, "")
        except (psutil.Error, OSError):
            continue
        if launch_id in value.split(":"):
            found.append(process)
    return found


def _signal_all(processes: Iterable[psutil.Process], sig: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error, OSError):
            process.send_signal(sig)


def kill_launch(
    launch_id: str,
    *,
    groups: Iterable[int] = (),
    extra: Iterable[psutil.Process] = (),
    grace_s: float = 5.0,
    deadline_s: float = 20.0,
    exclude: Iterable[int] = (),
) -> int:
    """SIGTERM every process of the launch (and `groups`, `extra`), SIGKILL the rest.

    Returns how many processes were found alive at the last scan (0 = all gone).
    """
    exclude = set(exclude) | {os.getpid()}
    groups = [g for g in groups if g not in (os.getpgrp(),)]

    def scan() -> list[psutil.Process]:
        found = {p.pid: p for p in marked_processes(launch_id, exclude=exclude)}
        for process in extra:
            if process.pid not in exclude and process.is_running():
                found.setdefault(process.pid, process)
        for group in groups:
            for process in psutil.process_iter():
                with contextlib.suppress(psutil.Error, OSError):
                    if process.pid not in exclude and os.getpgid(process.pid) == group:
                        found.setdefault(process.pid, process)
        return [p for p in found.values() if _alive(p)]

    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGTERM)
    targets = scan()
    _signal_all(targets, signal.SIGTERM)
    started = time.monotonic()
    while targets and time.monotonic() - started < grace_s:
        time.sleep(0.2)
        targets = [p for p in targets if _alive(p)] or scan()
    # Whatever is left (or was started meanwhile) is killed, until a scan finds nothing.
    while time.monotonic() - started < deadline_s:
        for group in groups:
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGKILL)
        targets = scan()
        if not targets:
            return 0
        _signal_all(targets, signal.SIGKILL)
        time.sleep(0.2)
    return len(scan())


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Supervisor:
    """Tracks what a launcher starts and stops all of it, however the launcher ends.

        with Supervisor() as supervisor:
            server = supervisor.popen([...], start_new_session=True)
            ...

    Children started through `popen` (or given to `track`) get `env()`'s launch mark;
    so do their descendants, whatever session they start.
    """

    def __init__(
        self,
        *,
        grace_s: float = 5.0,
        watchdog: bool = False,
        signals: Iterable[int] = HANDLED_SIGNALS,
        mark_environment: bool = True,
        kill_descendants: bool = True,
    ) -> None:
        """
        Args:
            grace_s: time between SIGTERM and SIGKILL at shutdown.
            watchdog: start a watchdog process that cleans up after a SIGKILL of this one.
            signals: signals that trigger the shutdown (main thread only).
            mark_environment: put the mark into `os.environ` too, so that processes started
                by libraries (multiprocessing, vLLM) carry it. Off in a shared process
                such as pytest, where later, unrelated children would inherit it.
            kill_descendants: also stop every descendant of this process at shutdown (off
                in a shared process, for the same reason).
        """
        self.launch_id = uuid.uuid4().hex[:16]
        self.grace_s = grace_s
        self._watchdog_wanted = watchdog
        self._signals = tuple(signals)
        self._mark_environment = mark_environment
        self._kill_descendants = kill_descendants
        self._watchdog: subprocess.Popen | None = None
        self._tracked: list[subprocess.Popen] = []
        self._previous_handlers: dict[int, Any] = {}
        self._inherited = os.environ.get(LAUNCH_ENV, "")
        self._closed = False
        self._lock = threading.Lock()

    @property
    def mark(self) -> str:
        """The value of `LAUNCH_ENV` for this launcher's children."""
        return ":".join(filter(None, [self._inherited, self.launch_id]))

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) with this launch's mark."""
        return dict(os.environ if base is None else base) | {LAUNCH_ENV: self.mark}

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen:
        """`subprocess.Popen` with the launch mark added to its environment; tracked."""
        kwargs["env"] = self.env(kwargs.get("env"))
        return self.track(subprocess.Popen(args, **kwargs))

    def track(self, process: subprocess.Popen) -> subprocess.Popen:
        self._tracked.append(process)
        return process

    def __enter__(self) -> Supervisor:
        # Library code that starts processes itself (multiprocessing, vLLM) reads os.environ.
        if self._mark_environment:
            os.environ[LAUNCH_ENV] = self.mark
        atexit.register(self.shutdown)
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        if self._watchdog_wanted:
            self._start_watchdog()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        for sig in HANDLED_SIGNALS:  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        print(
            f"{signal.Signals(signum).name}: stopping every process this launcher started",
            file=sys.stderr,
            flush=True,
        )
        self.shutdown()
        raise SystemExit(128 + signum)

    def shutdown(self) -> int:
        """Stop every tracked and marked process; idempotent. Returns how many survived."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
        groups = []
        for process in self._tracked:
            with contextlib.suppress(OSError):
                if process.poll() is None:
                    groups.append(os.getpgid(process.pid))
        extra = []
        if self._kill_descendants:
            with contextlib.suppress(psutil.Error):
                extra = psutil.Process().children(recursive=True)
        exclude = {self._watchdog.pid} if self._watchdog is not None else set()
        left = kill_launch(
            self.launch_id, groups=groups, extra=extra, grace_s=self.grace_s, exclude=exclude
        )
        for process in self._tracked:
            with contextlib.suppress(Exception):
                process.wait(timeout=1)
        if self._watchdog is not None:
            with contextlib.suppress(OSError):
                self._watchdog.kill()
            with contextlib.suppress(Exception):
                self._watchdog.wait(timeout=5)
        for sig, handler in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
        atexit.unregister(self.shutdown)
        return left

    def _start_watchdog(self) -> None:
        """A process in its own session that sweeps the launch once this process is gone."""
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", __name__, str(os.getpid()), self.launch_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=self._watchdog_env(),
        )

    @staticmethod
    def _watchdog_env() -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != LAUNCH_ENV}
        path = [_repo_root(), os.environ.get("PYTHONPATH", "")]
        return env | {"PYTHONPATH": os.pathsep.join(filter(None, path))}


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exit_on_sigterm() -> bool:
    """Make SIGTERM raise SystemExit(143) (so `finally` and `close()` run) where it would
    kill the process outright: in the main thread, when no handler is installed yet.

    Returns whether the handler was installed. Used by objects that start processes of
    their own (the vLLM engine, the update worker group).
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _raise_system_exit)
    return True


def _raise_system_exit(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise SystemExit(128 + signum)


def stop_children(
    pids: Iterable[int], grace_s: float = 10.0, wait: Callable[[], None] | None = None
) -> int:
    """SIGTERM the still-running processes `pids`, SIGKILL them after `grace_s`.

    For objects that started processes they do not fully control (vLLM's engine core):
    `wait`, if given, is called first (e.g. the library's own shutdown). Returns how many
    were still alive and had to be signalled.
    """
    if wait is not None:
        wait()
    processes = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            processes.append(psutil.Process(pid))
    alive = [p for p in processes if _alive(p)]
    if not alive:
        return 0
    _signal_all(alive, signal.SIGTERM)
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    _signal_all(still, signal.SIGKILL)
    psutil.wait_procs(still, timeout=5)
    return len(alive)


def _watch(parent_pid: int, launch_id: str) -> None:
    """Watchdog body: once `parent_pid` is gone, stop every process of the launch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        parent = psutil.Process(parent_pid)
        while _alive(parent):
            time.sleep(0.5)
    except psutil.Error:
        pass
    kill_launch(launch_id, grace_s=3.0)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2])
