"""Grading in worker processes under a hard per-answer time limit (`RewardGrader`).

math-verify's own timeout uses SIGALRM, which works only in the main thread (Prefect
runs tasks in worker threads), so symbolic answers go to subprocess workers; one that
overruns is killed and replaced.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

from pipeline_lib.rewards.answers import (
    AnswerExtraction,
    _boxed_reward_without_sympy,
    _plain_rewards,
    _symbolic_reward,
    extract_boxed,
)

# Caps a worker's address space: "9999999999^{9999999999}" would otherwise grow a
# multi-GB integer until the time limit struck. A warm worker uses about 100 MB.
WORKER_MEMORY_LIMIT_BYTES = 2 * 1024**3

# CPU seconds beyond its time limit after which a busy worker kills itself (see
# `_limit_cpu_time`); only matters when the parent is gone.
WORKER_CPU_BACKSTOP_S = 10.0

# A worker imports sympy and math-verify before it is ready (1-5 s on a loaded machine).
WORKER_START_TIMEOUT_S = 120.0


# --- process pool with a hard time limit -----------------------------------------------

_READY = "ready"

# A worker is a fresh interpreter (like the "spawn" start method, never fork: the caller
# may hold torch threads) started with subprocess rather than multiprocessing, so that it
# does not re-import the caller's __main__ (a Prefect flow module pulls in torch and
# prefect: seconds and hundreds of MB per worker). It talks over an inherited socket.
_WORKER_COMMAND = (
    "import sys; from pipeline_lib.rewards.grading import _serve; _serve(int(sys.argv[1]))"
)
_WARM_UP_PAIRS = [
    ("\\frac{1}{2}", "0.5"),
    ("x^2+2x+1", "(x+1)^2"),
    ("(1, 2)", "[1, 2)"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}"),
    ("y = 2x", "2x"),
]
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def _serve(fd: int) -> None:
    """Worker loop: grade (task_id, answer, reference, timeout_s) messages on socket `fd`."""
    import logging

    # The parent decides the worker's lifetime (Ctrl-C reaches it, and it kills us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_LIMIT_BYTES, WORKER_MEMORY_LIMIT_BYTES))
    # math-verify logs every unparsable answer; model output makes that a flood.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    conn = Connection(fd)
    # Import and warm up before "ready" (2-3 s): the first answers must not spend their
    # time limit loading sympy, the LaTeX grammar and the lazily imported simplifiers.
    for answer, reference in _WARM_UP_PAIRS:
        _symbolic_reward(answer, reference)
    conn.send(_READY)
    while True:
        try:
            task_id, answer, reference, timeout_s = conn.recv()
        except EOFError:  # the parent closed the socket or died: nothing left to grade
            return
        _limit_cpu_time(timeout_s + WORKER_CPU_BACKSTOP_S)
        try:
            score = _symbolic_reward(answer, reference)
        except Exception:  # noqa: BLE001  (any failure to grade is a wrong answer)
            score = 0.0
        conn.send((task_id, score))


def _limit_cpu_time(seconds: float) -> None:
    """Have the kernel kill this process (SIGXCPU) after `seconds` more CPU time.

    The parent kills a worker at the time limit; this backstop covers a parent that died
    (SIGKILL, OOM) while its worker was busy: sympy holds the GIL inside one huge
    integer operation, so no thread or signal handler in the worker could end it.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + seconds)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    started_at: float
    ready: bool = False
    task_id: int | None = None
    deadline: float = 0.0

    def kill(self) -> None:
        self.conn.close()  # an idle worker exits on EOF; a busy one needs the kill
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _worker_environment() -> dict[str, str]:
    """The caller's environment with this package importable (it may run from a checkout)."""
    paths = [_PACKAGE_PARENT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths)}


def _start_worker() -> _Worker:
    parent_socket, child_socket = socket.socketpair()
    with child_socket:
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_COMMAND, str(child_socket.fileno())],
            pass_fds=[child_socket.fileno()],
            env=_worker_environment(),
            stdin=subprocess.DEVNULL,
        )
    return _Worker(
        process=process, conn=Connection(parent_socket.detach()), started_at=time.monotonic()
    )


def _kill_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.kill()
    workers.clear()


def _default_worker_count() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0))))


class RewardGrader:
    """Grades boxed answers in long-lived worker processes, each answer under a hard limit.

    One process per slot, talking over a socket; an answer that overruns its limit scores
    0.0 and its worker is killed and replaced, so a hung sympy can stall neither the
    caller nor the other slots. Safe to call from any thread (calls are serialised).
    Workers start on first use (about 3 s of CPU each: importing sympy) and live until
    `close()`, garbage collection or interpreter exit. Each worker's memory is capped
    (`WORKER_MEMORY_LIMIT_BYTES`) and a worker whose parent died kills itself soon after
    (`_limit_cpu_time`).
    """

    def __init__(self, max_workers: int | None = None) -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.max_workers = max_workers or _default_worker_count()
        self.timeouts = 0
        """How many answers have hit the time limit since this grader was made."""
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        # Kills the workers even if close() is never called; must not reference self.
        self._finalizer = weakref.finalize(self, _kill_workers, self._workers)

    def __enter__(self) -> RewardGrader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def grade(
        self,
        completions: Sequence[str],
        references: Sequence[str],
        extraction: AnswerExtraction | str = AnswerExtraction.BOXED,
        timeout_s: float = 1.0,
    ) -> list[float]:
        """Rewards in {0.0, 1.0}, one per (completion, reference) pair, in order."""
        if len(completions) != len(references):
            raise ValueError(f"{len(completions)} completions but {len(references)} references")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        extraction = AnswerExtraction(extraction)
        if extraction is not AnswerExtraction.BOXED:
            return _plain_rewards(completions, references, extraction)
        rewards: list[float] = []
        symbolic: list[tuple[int, str, str]] = []
        for index, (completion, reference) in enumerate(zip(completions, references, strict=True)):
            answer = extract_boxed(completion)
            verdict = _boxed_reward_without_sympy(answer, reference)
            rewards.append(0.0 if verdict is None else verdict)
            if verdict is None:
                symbolic.append((index, answer, reference))
        if symbolic:
            with self._lock:
                for index, score in self._grade_in_workers(symbolic, timeout_s).items():
                    rewards[index] = score
        return rewards

    def close(self) -> None:
        """Stop the workers. The grader starts new ones if it is used again."""
        with self._lock:
            _kill_workers(self._workers)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _start_worker()

    def _grade_in_workers(
        self, tasks: list[tuple[int, str, str]], timeout_s: float
    ) -> dict[int, float]:
        """Scores by task id; returns once every task has a score or has timed out."""
        while len(self._workers) < self.max_workers:
            self._workers.append(_start_worker())
        queue = deque(tasks)
        scores: dict[int, float] = {}
        while len(scores) < len(tasks):
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.ready and worker.task_id is None and queue:
                    task = queue.popleft()
                    try:
                        worker.conn.send((*task, timeout_s))
                    except OSError:  # died while idle: grade the task elsewhere
                        queue.appendleft(task)
                        self._replace(worker)
                        continue
                    worker.task_id, worker.deadline = task[0], now + timeout_s
            waiting = [w for w in self._workers if not w.ready or w.task_id is not None]
            wake_at = min(
                w.deadline if w.ready else w.started_at + WORKER_START_TIMEOUT_S for w in waiting
            )
            for conn in wait([w.conn for w in waiting], timeout=max(0.0, wake_at - now)):
                worker = next(w for w in self._workers if w.conn is conn)
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._on_worker_death(worker, scores)
                    continue
                if message == _READY:
                    worker.ready = True
                else:
                    task_id, score = message
                    scores[task_id] = score
                    worker.task_id = None
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.task_id is not None and now >= worker.deadline:
                    scores[worker.task_id] = 0.0
                    self.timeouts += 1
                    self._replace(worker)
                elif not worker.ready and now >= worker.started_at + WORKER_START_TIMEOUT_S:
                    raise RuntimeError(
                        f"reward worker did not start within {WORKER_START_TIMEOUT_S:.0f} s"
                    )
        return scores

    def _on_worker_death(self, worker: _Worker, scores: dict[int, float]) -> None:
        if not worker.ready:
            raise RuntimeError(
                f"reward worker exited while starting (exit code {worker.process.wait()}); "
                "its stderr above says why"
            )
        if worker.task_id is not None:  # sympy crashed the process: a wrong answer
            scores[worker.task_id] = 0.0
        self._replace(worker)


# --- convenience functions --------------------------------------------------------------

_default_graders: dict[int, RewardGrader] = {}
_default_graders_lock = threading.Lock()


def default_grader(max_workers: int | None = None) -> RewardGrader:
    """The process-wide grader that `grade_batch` and `math_reward` use when given none.

    Kept warm across calls (starting workers costs seconds; the convenience functions run
    once per batch); one per worker count; its workers die with the process.
    """
    count = max_workers or _default_worker_count()
    with _default_graders_lock:
        if count not in _default_graders:
            _default_graders[count] = RewardGrader(max_workers=count)
        return _default_graders[count]


def grade_batch(
    completions: Sequence[str],
    references: Sequence[str],
    extraction: AnswerExtraction | str = AnswerExtraction.BOXED,
    timeout_s: float = 1.0,
    max_workers: int | None = None,
    grader: RewardGrader | None = None,
) -> list[float]:
    """Rewards in {0.0, 1.0} for a batch, each boxed answer under a hard `timeout_s` limit.

    Plain-number extractions are graded in-process (cheap and bounded). Boxed answers go
    to `grader`, or to a process-wide grader kept warm across calls.
    """
    extraction = AnswerExtraction(extraction)
    if extraction is not AnswerExtraction.BOXED:
        return _plain_rewards(completions, references, extraction)
    grader = grader or default_grader(max_workers)
    return grader.grade(completions, references, extraction, timeout_s)


def math_reward(completion: str, reference: str) -> float:
    """1.0 when the completion's last `\\boxed{}` is mathematically equal to the reference
    (a MATH-style answer without a box), else 0.0. At most about a second per call."""
    return grade_batch([completion], [reference])[0]


def reward(
    completion: str, reference: str, extraction: AnswerExtraction | str = AnswerExtraction.BOXED
) -> float:
    """One completion's reward under `extraction` (see `AnswerExtraction`)."""
    return grade_batch([completion], [reference], extraction)[0]
