"""A completion's final answer and whether it equals the reference: pure functions.

Plain numbers are compared exactly as decimals; MATH-style answers (the last
`\\boxed{...}`) by math-verify in `_symbolic_reward`, which `grading.py` runs in
worker processes under a time limit (sympy can run for minutes).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from enum import StrEnum


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
