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

from pipeline_lib.rewards.answers import AnswerExtraction, extract_answer, extract_boxed
from pipeline_lib.rewards.grading import (
    RewardGrader,
    default_grader,
    grade_batch,
    math_reward,
    reward,
)

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
