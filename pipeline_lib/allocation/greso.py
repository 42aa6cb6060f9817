"""GRESO's pre-rollout skipping (Infini-AI-Lab/GRESO, arXiv 2506.02177), as its code does it.

Source: Infini-AI-Lab/GRESO at b277843 (b27784315479921ea1977178d7e6c4858b2ae5a1):
`verl/trainer/ttis/presampling_selector.py` (`DataProfiler.easy_probabilistic_skip`
L102-122, `hard_probabilistic_skip` L124-147, `filter_examples_all_probabilistic`
L230-255) and `verl/trainer/ppo/ray_trainer.py` (targets L298-299, initial
probabilities L331-333, filtering L988-1018, adaptation L1199-1234).

Before rollout, a prompt whose latest k visits were all solved (every rollout
correct) is kept with probability max(p_easy^k, 0.01), one whose latest k visits were
all unsolved with max(p_hard^k, 0.01); a prompt never visited, or whose last visit
had both outcomes, is always kept. After each step (from the second epoch on) each
exploration probability moves by 0.01 towards its target share of zero-variance
groups, alpha / 3 for the solved and 2 alpha / 3 for the unsolved (alpha = 0.25),
within [0.05, 0.95]: more skipping while such groups are common, less when rare.

Deviations from the code, each because this project's loop does it one way for all
strategies:
- the streaks count the step's own prompts' visits (the status table); prompts a
  refilling round draws are spent compute and update data, not visits (GRESO records
  every rolled-out prompt);
- a visit is solved when every rollout succeeded and unsolved when none did (GRESO:
  mean reward >= 0.98 and <= 0.11, with a 0.1 reward for a well-formatted wrong
  answer; our rewards are 0 or 1);
- the batch is filled DAPO-style by the loop's refill rounds (prompts_per_step new
  prompts per round until prompts_per_step mixed groups or max_sampling_rounds),
  not by GRESO's 1.25x over-sampling estimate; a round never skips every prompt.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

INITIAL_KEEP = {"p_easy": 0.5, "p_hard": 0.5}  # ray_trainer.py L331-333
MIN_KEEP = 0.01  # floor on a prompt's keep probability (presampling_selector.py L102-147)
TARGET_ZERO_VARIANCE = 0.25  # alpha (the *_greso.sh scripts)
STEP = 0.01
BOUNDS = (0.05, 0.95)  # min_p, max_p


def keep_probabilities(
    solved_streak: np.ndarray, unsolved_streak: np.ndarray, state: Mapping[str, float]
) -> np.ndarray:
    """float[M]: the probability of rolling each prompt out this step."""
    solved = np.asarray(solved_streak, dtype=np.float64)
    unsolved = np.asarray(unsolved_streak, dtype=np.float64)
    keep = np.ones(solved.size)
    easy, hard = solved > 0, unsolved > 0
    keep[easy] = np.maximum(state["p_easy"] ** solved[easy], MIN_KEEP)
    keep[hard] = np.maximum(state["p_hard"] ** unsolved[hard], MIN_KEEP)
    return keep


def skip_mask(keep: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """bool[M]: the prompts skipped, one uniform draw each; never all of them."""
    skipped = rng.random(keep.size) >= keep
    if skipped.all() and skipped.size:
        skipped[int(np.argmax(keep))] = False  # the most likely one, lowest index on ties
    return skipped


def adapt_keep(
    state: Mapping[str, float], epoch: int, solved_share: float, unsolved_share: float
) -> dict[str, float]:
    """The exploration probabilities after a step whose rolled-out groups were
    `solved_share` all-correct and `unsolved_share` all-wrong (unchanged in epoch 0)."""
    if epoch == 0:
        return dict(state)
    low, high = BOUNDS
    updated = {}
    for key, share, target in (
        ("p_easy", solved_share, TARGET_ZERO_VARIANCE / 3),
        ("p_hard", unsolved_share, 2 * TARGET_ZERO_VARIANCE / 3),
    ):
        moved = state[key] - STEP if share >= target else state[key] + STEP
        updated[key] = float(min(max(moved, low), high))
    return updated
