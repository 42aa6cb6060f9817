"""Verifiable rewards: extract a completion's final answer and check it against a reference.

Two paths, chosen by `AnswerExtraction`:

- Plain numbers (GSM8K, synthetic arithmetic): a regex pulls the number out and it is
  compared exactly as a decimal. Cheap and linear in the text, so it runs in-process.
- MATH-style answers (the last `\\boxed{...}`): math-verify (sympy) decides equivalence.
  Sympy can run for minutes on adversarial input and math-verify's own timeout uses
  SIGALRM, which only works in the main thread (Prefect runs tasks in worker threads).
  So these answers are graded in worker processes under a hard per-answer time limit; a
  worker that overruns is killed and replaced (`RewardGrader`).
"""

from __future__ import annotations

import math
import os
import re
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
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from multiprocessing.connection import Connection, wait
from pathlib import Path

__all__ = [
    "AnswerExtraction",
    "RewardGrader",
    "default_grader",
    "extract_answer",
    "extract_boxed",
    "grade_batch",
    "math_reward",
    "reward",
]


class AnswerExtraction(StrEnum):
    """Where a completion's final answer is read from."""

    BOXED = "boxed"
    """The last `\\boxed{...}` (or `\\fbox{...}`); graded with math-verify."""
    ANSWER_LINE = "answer_line"
    """The number after the last `Answer:` / `answer is` / GSM8K's `####`, else the last box."""
    LAST_NUMBER = "last_number"
    """The last number anywhere in the text (synthetic arithmetic: `12+345=357`)."""


# Answers longer than this are compared as text only: no MATH answer is this long, and
# handing megabytes of model output to sympy only buys a timeout and a worker respawn.
MAX_SYMBOLIC_ANSWER_CHARS = 1_000
# Brackets nested deeper than this send sympy's parser into minutes of work, and no real
# answer nests this deep.
MAX_SYMBOLIC_NESTING = 30
# Caps a worker's address space: "9999999999^{9999999999}" would otherwise grow a
# multi-GB integer until the time limit struck. A warm worker uses about 100 MB.
WORKER_MEMORY_LIMIT_BYTES = 2 * 1024**3

# CPU seconds beyond its time limit after which a busy worker kills itself (see
# `_limit_cpu_time`); only matters when the parent is gone.
WORKER_CPU_BACKSTOP_S = 10.0

# A worker imports sympy and math-verify before it is ready (1-5 s on a loaded machine).
WORKER_START_TIMEOUT_S = 120.0

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)\b")
# Thousands separators only in groups of three, so a list "3,5,7" ends in the number 7.
# A minus counts only where it cannot be a binary operator ("12-5" ends in 5, not -5).
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])[-\u2212])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<!\d)\.\d+"
)
_ANSWER_MARKER = re.compile(r"\banswer\s*(?:is\b\s*:?|[:=])|####", re.IGNORECASE)
_NUMBER_AFTER_MARKER = re.compile(r"[\s$*\\(]*(" + _NUMBER.pattern + ")")
_CHOICE = re.compile(r"\(?([A-E])\)?")
_CHOICE_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_WHITESPACE = re.compile(r"\s+")
_SIZED_DELIMITER = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_PERCENT_SUFFIX = re.compile(r"\s*\\?%\s*$")


# --- extraction -------------------------------------------------------------------------


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, braces matched.

    Also accepts the brace-less form `\\boxed 5`. Returns None when there is no box or
    the last one is unbalanced (a truncated generation has no final answer). Linear time.
    """
    last = _last_match(_BOX_COMMAND, text)
    if last is None:
        return None
    start = last.end()
    while start < len(text) and text[start] == " ":
        start += 1
    if start >= len(text):
        return None
    if text[start] != "{":
        token = re.match(r"[^\s$]+", text[start:])
        return token.group(0) if token else None
    depth = 0
    position = start
    while position < len(text):
        char = text[position]
        if char == "\\":  # \{ and \} are literal braces (a set), not grouping
            position += 1
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : position].strip()
        position += 1
    return None


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = deque(pattern.finditer(text), maxlen=1)
    return last[0] if last else None


def _last_number(text: str) -> str | None:
    last = _last_match(_NUMBER, text)
    return None if last is None else _canonical_number_text(last.group(0))


def _answer_line_number(text: str) -> str | None:
    marker = _last_match(_ANSWER_MARKER, text)
    if marker is not None:
        number = _NUMBER_AFTER_MARKER.match(text, marker.end())
        if number is not None:
            return _canonical_number_text(number.group(1))
    # Models asked for "Answer: N" often box it instead; the box is still a final answer,
    # unlike the last number of a rambling text.
    boxed = extract_boxed(text)
    if boxed is None or _parse_number(boxed) is None:
        return boxed
    return _canonical_number_text(boxed.strip().strip("$").strip())


def _canonical_number_text(number: str) -> str:
    return number.replace(",", "").replace("\u2212", "-")


def extract_answer(
    completion: str, extraction: AnswerExtraction | str = AnswerExtraction.BOXED
) -> str | None:
    """The completion's final answer as text, or None when it gives none.

    Numbers come back without thousands separators ("1,000" -> "1000").
    """
    extraction = AnswerExtraction(extraction)
    if extraction is AnswerExtraction.BOXED:
        return extract_boxed(completion)
    if extraction is AnswerExtraction.ANSWER_LINE:
        return _answer_line_number(completion)
    return _last_number(completion)


# --- comparison -------------------------------------------------------------------------


def _parse_number(text: str) -> Decimal | None:
    """`text` as an exact decimal when it is one number (after `$`, spaces, a final '.')."""
    stripped = text.strip().strip("$").strip().rstrip(".")
    if _NUMBER.fullmatch(stripped) is None:
        return None
    try:
        return Decimal(_canonical_number_text(stripped))
    except InvalidOperation:
        return None


def _plain_reward(answer: str | None, reference: str) -> float:
    """Exact numeric equality ("357" == "357.0" == "357.00"), else exact text equality."""
    if answer is None:
        return 0.0
    answer_number, reference_number = _parse_number(answer), _parse_number(reference)
    if answer_number is not None and reference_number is not None:
        return float(answer_number == reference_number)
    return float(_WHITESPACE.sub("", answer) == _WHITESPACE.sub("", reference))


def _plain_rewards(
    completions: Sequence[str], references: Sequence[str], extraction: AnswerExtraction
) -> list[float]:
    return [
        _plain_reward(extract_answer(completion, extraction), reference)
        for completion, reference in zip(completions, references, strict=True)
    ]


def _same_latex_text(answer: str, reference: str) -> bool:
    """Identical up to whitespace and `\\dfrac`/`\\tfrac`: equal without asking sympy."""

    def normalize(latex: str) -> str:
        latex = _SIZED_DELIMITER.sub("", latex).replace("\\dfrac", "\\frac")
        return _WHITESPACE.sub("", latex.replace("\\tfrac", "\\frac"))

    return normalize(answer) == normalize(reference)


def _choice_letter(latex: str) -> str | None:
    """'C' for a multiple-choice answer written C, (C), \\text{(C)} or \\textbf{C}."""
    unwrapped = _CHOICE_WRAPPER.sub(r"\1", latex).replace(" ", "").strip("$")
    letter = _CHOICE.fullmatch(unwrapped)
    return None if letter is None else letter.group(1)


def _symbolic_reward(answer: str, reference: str) -> float:
    """math-verify's verdict on a box's content vs a MATH-style reference. Unbounded time:
    call it only where the caller enforces a limit (a `RewardGrader` worker)."""
    # Imported here: sympy takes a second to import and only the workers need it.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    extraction_config = [LatexExtractionConfig(), ExprExtractionConfig()]
    # MATH graders read "25\\%" as 25 (math-verify reads it as 0.25, so "25" would fail).
    answer, reference = _PERCENT_SUFFIX.sub("", answer), _PERCENT_SUFFIX.sub("", reference)
    # Timeouts off: math-verify's alarm would fire in the middle of the worker's loop and
    # the grader's hard limit already bounds each answer.
    gold = parse(
        "\\boxed{" + reference + "}", extraction_config=extraction_config, parsing_timeout=None
    )
    predicted = parse(
        "\\boxed{" + answer + "}", extraction_config=extraction_config, parsing_timeout=None
    )
    if not gold or not predicted:
        return 0.0
    return float(verify(gold, predicted, timeout_seconds=None))


def _boxed_reward_without_sympy(answer: str | None, reference: str) -> float | None:
    """The verdict when it needs no sympy, else None (the answer needs `_symbolic_reward`)."""
    if answer is None or not answer:
        return 0.0
    if _same_latex_text(answer, reference):
        return 1.0
    answer_choice, reference_choice = _choice_letter(answer), _choice_letter(reference)
    if answer_choice is not None and reference_choice is not None:
        return float(answer_choice == reference_choice)
    if len(answer) > MAX_SYMBOLIC_ANSWER_CHARS or _nesting_depth(answer) > MAX_SYMBOLIC_NESTING:
        return 0.0
    return None


def _nesting_depth(latex: str) -> int:
    depth = deepest = 0
    for char in latex:
        if char in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")}]":
            depth -= 1
    return deepest


# --- process pool with a hard time limit -----------------------------------------------

_READY = "ready"

# A worker is a fresh interpreter (like the "spawn" start method, never fork: the caller
# may hold torch threads) started with subprocess rather than multiprocessing, so that it
# does not re-import the caller's __main__ (a Prefect flow module pulls in torch and
# prefect: seconds and hundreds of MB per worker). It talks over an inherited socket.
_WORKER_COMMAND = (
    "import sys; sys.path.insert(0, sys.argv[2]); "
    "from pipeline_lib.rewards import _serve; _serve(int(sys.argv[1]))"
)
_WARM_UP_PAIRS = [
    ("\\frac{1}{2}", "0.5"),
    ("x^2+2x+1", "(x+1)^2"),
    ("(1, 2)", "[1, 2)"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}"),
    ("y = 2x", "2x"),
]
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


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


def _start_worker() -> _Worker:
    parent_socket, child_socket = socket.socketpair()
    with child_socket:
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_COMMAND, str(child_socket.fileno()), _PACKAGE_PARENT],
            pass_fds=[child_socket.fileno()],
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
