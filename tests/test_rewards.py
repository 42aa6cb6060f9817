"""Rewards: answer extraction, math-verify equivalence, and the hard time limit per answer."""

import json
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.rewards import (
    AnswerExtraction,
    RewardGrader,
    default_grader,
    extract_answer,
    extract_boxed,
    grade_batch,
    math_reward,
    reward,
)

# Generous: these tests check grading, not speed, and the test machine may be loaded.
CORRECTNESS_TIMEOUT_S = 20.0

POWER_TOWER = "\\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}"  # sympy runs for minutes on it


@pytest.fixture(scope="module")
def grader():
    """The process-wide grader (so `math_reward` and `grade_batch` share its warm workers)."""
    grader = default_grader()
    yield grader
    grader.close()


@pytest.fixture(scope="module")
def math500_answers() -> list[str]:
    shared = Path(__file__).parents[1].parent / "shared"
    path = shared / "data" / "math500" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"MATH500 not found at {path} (the project's shared data directory)")
    with path.open() as lines:
        return [json.loads(line)["answer"] for line in lines]


# --- extraction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{5}.", "5"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("first \\boxed{3}, then \\boxed{4}", "4"),  # the last box is the final answer
        ("\\fbox{7}", "7"),
        ("\\boxed 9 is it", "9"),  # brace-less form
        ("\\boxed{ 12 }", "12"),
        ("\\boxed{\\boxed{6}}", "6"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are a set, not a group
        ("\\boxed{\\}}", "\\}"),
        (
            "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
            "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        ),
        ("no box here", None),
        ("\\boxed{12", None),  # truncated generation
        ("\\boxed{3} and \\boxed{\\frac{1}{2}", None),
        ("\\boxed", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "extraction", "expected"),
    [
        ("357", "last_number", "357"),
        ("  12+ 345=357", "last_number", "357"),
        ("total is 1,000 apples", "last_number", "1000"),
        ("it is -7", "last_number", "-7"),
        ("12-5", "last_number", "5"),  # a binary minus is not a sign
        ("x is 3.25.", "last_number", "3.25"),
        ("lists 3,5,7", "last_number", "7"),  # not a thousands separator
        ("no digits", "last_number", None),
        ("Answer: 42", "answer_line", "42"),
        ("step 1 ... answer: $-3.5$ dollars", "answer_line", "-3.5"),
        ("#### 1,234", "answer_line", "1234"),
        ("The final answer is 42.", "answer_line", "42"),
        ("**Answer:** \\(7\\)", "answer_line", "7"),
        ("so \\boxed{\\frac{1}{2}}", "answer_line", "\\frac{1}{2}"),  # not its last number
        ("Answer: 1\nmore thoughts\nFinal answer: 2", "answer_line", "2"),
        ("so \\boxed{42}", "answer_line", "42"),  # falls back to the box
        ("just 42", "answer_line", None),  # not to a stray number
        ("the \\boxed{x}", "boxed", "x"),
    ],
)
def test_extract_answer(text, extraction, expected):
    assert extract_answer(text, extraction) == expected


# --- plain-number rewards ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "reference", "extraction", "expected"),
    [
        ("357", "357", "last_number", 1.0),
        ("357.0", "357", "last_number", 1.0),
        ("1,000", "1000", "last_number", 1.0),
        ("1000", "1,000", "last_number", 1.0),
        ("-7", "-7", "last_number", 1.0),
        ("0.50", ".5", "last_number", 1.0),
        ("358", "357", "last_number", 0.0),
        ("7", "-7", "last_number", 0.0),
        ("35", "357", "last_number", 0.0),
        ("", "0", "last_number", 0.0),
        ("Answer: 18", "18", "answer_line", 1.0),
        ("#### 18.00", "18", "answer_line", 1.0),
        ("18", "18", "answer_line", 0.0),  # the answer line is part of the task
        ("so \\boxed{18}", "18", "answer_line", 1.0),
    ],
)
def test_plain_number_reward(completion, reference, extraction, expected):
    assert reward(completion, reference, extraction) == expected
    assert grade_batch([completion], [reference], extraction) == [expected]


def test_plain_number_reward_of_a_huge_number_is_exact_and_fast():
    huge = "9" * 100_000
    start = time.perf_counter()
    assert reward(huge, huge, "last_number") == 1.0
    assert reward(huge, huge[:-1] + "8", "last_number") == 0.0
    assert time.perf_counter() - start < 10.0


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789,.-+= \\{}boxedAnswer:#$")))
def test_plain_extraction_never_fails_on_any_text(text):
    for extraction in ("last_number", "answer_line", "boxed"):
        extract_answer(text, extraction)
    assert reward(text, "12", "last_number") in (0.0, 1.0)
    assert reward(text, "12", "answer_line") in (0.0, 1.0)


def test_extraction_names_are_validated():
    with pytest.raises(ValueError):
        grade_batch(["1"], ["1"], extraction="first_number")
    assert AnswerExtraction("last_number") is AnswerExtraction.LAST_NUMBER


# --- boxed (math-verify) rewards --------------------------------------------------------

EQUIVALENT = [
    ("\\boxed{\\frac{1}{2}}", "0.5"),  # fraction vs decimal
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac34"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),  # radicals
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}2"),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),  # tuples
    ("\\boxed{[0, \\infty)}", "[0,\\infty)"),  # intervals
    ("\\boxed{(0,9)\\cup(9,36)}", "(0,9) \\cup (9,36)"),
    ("\\boxed{145}", "145^\\circ"),  # degrees
    ("\\boxed{145^{\\circ}}", "145^\\circ"),
    ("\\boxed{36}", "\\$36"),  # dollars
    ("\\boxed{\\$36.00}", "\\$36"),
    ("\\boxed{1,000}", "1000"),  # thousands separators
    ("\\boxed{10080}", "10,080"),
    ("\\boxed{25}", "25\\%"),  # percent, as MATH graders read it
    ("\\boxed{\\text{(C)}}", "\\text{(C)}"),  # multiple choice
    ("\\boxed{C}", "\\text{(C)}"),
    ("\\boxed{(C)}", "\\text{(C)}"),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}"),  # text answers
    ("\\boxed{even}", "\\text{even}"),
    ("\\boxed{7,5,3}", "3, 5, 7"),  # a list of solutions is a set
    ("\\boxed{1+\\sqrt{19}, 1-\\sqrt{19}}", "1 \\pm \\sqrt{19}"),
    ("\\boxed{\\frac{9}{5}}", "1\\frac{4}{5}"),  # mixed numbers
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),  # algebra
    ("\\boxed{y=-2x}", "y = -2x"),
    ("\\boxed{x=5}", "5"),
    ("\\boxed{6.72\\times10^{-5}}", ".0000672"),
    (
        "\\boxed{\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}}",
        "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
    ),
    ("\\fbox{7}", "7"),
    ("We get \\boxed{3}, no wait: \\boxed{4}", "4"),
]

NOT_EQUIVALENT = [
    ("The answer is 5", "5"),  # no box
    ("\\boxed{0.51}", "\\frac12"),
    ("\\boxed{-5}", "5"),
    ("\\boxed{(2,1)}", "(1,2)"),  # ordered pairs
    ("\\boxed{[0,1]}", "(0,1)"),  # closed vs open interval
    ("\\boxed{1,000}", "100"),
    ("\\boxed{B}", "\\text{(C)}"),
    ("\\boxed{\\text{odd}}", "\\text{even}"),
    ("\\boxed{2}", "1\\frac{4}{5}"),
    ("\\boxed{0.333}", "\\frac13"),
    ("\\boxed{5}", "5\\sqrt{2}"),
    ("\\boxed{4}, no wait: \\boxed{3}", "4"),  # only the last box counts
    ("\\boxed{5", "5"),  # unbalanced
    ("\\boxed{}", "0"),
]


def test_equivalent_answers_score_one(grader):
    completions, references = zip(*EQUIVALENT, strict=True)
    rewards = grader.grade(completions, references, timeout_s=CORRECTNESS_TIMEOUT_S)
    assert [case for case, score in zip(EQUIVALENT, rewards, strict=True) if score != 1.0] == []


def test_different_answers_score_zero(grader):
    completions, references = zip(*NOT_EQUIVALENT, strict=True)
    rewards = grader.grade(completions, references, timeout_s=CORRECTNESS_TIMEOUT_S)
    assert [case for case, score in zip(NOT_EQUIVALENT, rewards, strict=True) if score != 0.0] == []


def test_math_reward_contract():
    """The project-wide contract: a float, 1.0 for an equal final answer, else 0.0."""
    assert math_reward("so $x = \\boxed{\\dfrac{1}{2}}$.", "0.5") == 1.0
    assert math_reward("so $x = \\boxed{\\dfrac{1}{3}}$.", "0.5") == 0.0
    assert math_reward("no final answer", "0.5") == 0.0
    assert isinstance(math_reward("\\boxed{1}", "1"), float)


# --- bounded time -----------------------------------------------------------------------

ADVERSARIAL = [
    ("\\boxed{" + "9" * 100_000 + "}", "9" * 100_000),  # huge number, equal
    ("\\boxed{" + "9" * 100_000 + "}", "1"),
    (POWER_TOWER, "3"),
    ("\\boxed{9999999999^{9999999999}}", "1"),  # an integer of 10^11 digits
    ("\\boxed{" * 200 + "5" + "}" * 200, "5"),  # 200 nested boxes
    ("\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}", "1"),  # deep nesting stalls the parser
    ("", "5"),
    ("}}}{{{\\boxed{{{{", "5"),  # unbalanced braces
    ("\\boxed{\\frac{1}{2}", "0.5"),
    ("\\boxed{" + "x+" * 300 + "x}", "301x"),
]


def test_adversarial_inputs_grade_in_bounded_time(grader):
    """Hard inputs score 0.0 within about the time limit, and the grader recovers."""
    grader.grade(["\\boxed{1}"], ["2"])  # workers started: time the grading, not the start
    timeouts_before = grader.timeouts
    completions, references = zip(*ADVERSARIAL, strict=True)
    start = time.perf_counter()
    rewards = grader.grade(completions, references, timeout_s=1.0)
    elapsed = time.perf_counter() - start
    assert all(score in (0.0, 1.0) for score in rewards)
    assert rewards[0] == 1.0 and rewards[4] == 1.0  # equal answers stay equal
    assert rewards[1] == rewards[2] == rewards[3] == rewards[5] == 0.0
    assert grader.timeouts - timeouts_before >= 2  # the power tower and the huge power
    # Two sympy-hard answers on two workers: about a second each, plus a worker respawn.
    assert elapsed < 30.0, f"adversarial batch took {elapsed:.1f} s"
    # The killed workers' replacements grade the next answers.
    assert grader.grade(
        ["\\boxed{2\\sqrt2}", "\\boxed{3}"], ["\\sqrt8", "4"], timeout_s=CORRECTNESS_TIMEOUT_S
    ) == [1.0, 0.0]


def test_grade_batch_works_from_a_worker_thread(grader):
    """Prefect runs tasks in threads, where math-verify's own (signal) timeout cannot."""
    results: list[list[float]] = []
    errors: list[BaseException] = []

    def grade() -> None:
        try:
            results.append(
                grade_batch(
                    ["\\boxed{\\frac{1}{2}}", "\\boxed{3}", "\\boxed{(x+1)^2}"],
                    ["0.5", "4", "x^2+2x+1"],
                    timeout_s=CORRECTNESS_TIMEOUT_S,
                )
            )
        except BaseException as error:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(error)

    thread = threading.Thread(target=grade)
    thread.start()
    thread.join(timeout=120)
    assert not errors, errors
    assert results == [[1.0, 0.0, 1.0]]


def test_bad_arguments_are_rejected(grader):
    with pytest.raises(ValueError):
        grader.grade(["\\boxed{1}"], ["1", "2"])
    with pytest.raises(ValueError):
        grader.grade(["\\boxed{1}"], ["1"], timeout_s=0.0)
    with pytest.raises(ValueError):
        grade_batch(["1"], ["1", "2"], extraction="last_number")
    with pytest.raises(ValueError):
        RewardGrader(max_workers=0)
    assert grader.grade([], []) == []


# --- MATH500 ----------------------------------------------------------------------------


def test_every_math500_answer_equals_itself_reboxed(grader, math500_answers):
    completions = ["The answer is \\boxed{" + answer + "}" for answer in math500_answers]
    rewards = grader.grade(completions, math500_answers, timeout_s=CORRECTNESS_TIMEOUT_S)
    assert [a for a, score in zip(math500_answers, rewards, strict=True) if score != 1.0] == []


def test_every_math500_answer_equals_itself_through_math_verify(grader, math500_answers):
    """`\\displaystyle` defeats the identical-text shortcut, so sympy judges all 500."""
    completions = ["\\boxed{\\displaystyle " + answer + "}" for answer in math500_answers]
    rewards = grader.grade(completions, math500_answers, timeout_s=CORRECTNESS_TIMEOUT_S)
    assert [a for a, score in zip(math500_answers, rewards, strict=True) if score != 1.0] == []


def test_math500_answers_rarely_equal_the_next_problems_answer(grader, math500_answers):
    shifted = math500_answers[1:] + math500_answers[:1]
    completions = ["\\boxed{" + answer + "}" for answer in math500_answers]
    rewards = grader.grade(completions, shifted, timeout_s=CORRECTNESS_TIMEOUT_S)
    # Measured: 3 of 500 ("3" twice in a row, "7" twice, and "5" vs "x=5").
    assert sum(rewards) / len(rewards) <= 0.02
