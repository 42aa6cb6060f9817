"""Reinforce-Ada's adaptive sampling (RLHFlow/Reinforce-Ada, arXiv 2510.04996), as its code does it.

Source: RLHFlow/Reinforce-Ada at 05be605 (05be6058dc04adc89d31a51f9903177a0c180f15),
`verl/trainer/ppo/ray_trainer.py`, `_generate_multi_round_adaptive_downsampling`
(L929-1221: rounds L979-1137, `downsample_cache` L1069-1083, exit rule L1087-1108, the
fallback for prompts never done L1139-1186), and `verl/trainer/ppo/core_algos.py`,
`compute_grpo_outcome_advantage` (L262; global statistics L305-327, L354-369).

Each prompt is sampled in rounds of `round_size` rollouts (the config's round_repeat,
here N_avg) until it holds at least n // 2 successes and n - n // 2 failures (the
`balanced` exit rule; n = the group size trained on, here N_avg too) or `max_rounds`
(4) rounds have run. The group trained on is n of its rollouts: the first
min(n // 2, successes) successes and failures up to n, filled from the other side when
one side is short, in generation order; a prompt with one outcome only still trains
on n rollouts (advantage 0, as the code keeps them). Advantages use every collected
reward of the prompt (`global_stat_est`): A = r - p, p the success rate over all its
rollouts, without the std division (`norm_adv_by_std_in_grpo=False` in
scripts/run_reinforce_ada.sh). Every generated rollout counts as spent compute.

Deviations: the round size and group size are N_avg (the script: round_repeat 8,
n = 4); success is reward >= 0.5 (the code: > 0.7; our rewards are 0 or 1).
"""

from __future__ import annotations

import numpy as np

MAX_ROUNDS = 4  # algorithm.max_rounds (verl/trainer/config/algorithm.py L89-95)


def balanced(successes: np.ndarray, rollouts: np.ndarray, group_size: int) -> np.ndarray:
    """bool[M]: prompts whose collected rollouts already hold the balanced group."""
    failures = rollouts - successes
    return (successes >= group_size // 2) & (failures >= group_size - group_size // 2)


def balanced_rows(group_ids: np.ndarray, successes: np.ndarray, group_size: int) -> np.ndarray:
    """bool[B]: the rows each prompt trains on (`downsample_cache`), in generation order.

    Args:
        group_ids: int[B] the prompt of each collected rollout, in generation order.
        successes: bool[B] whether each rollout succeeded.
    """
    group_ids, successes = np.asarray(group_ids), np.asarray(successes, dtype=bool)
    chosen = np.zeros(group_ids.size, dtype=bool)
    for group in np.unique(group_ids):
        rows = np.flatnonzero(group_ids == group)
        good, bad = rows[successes[rows]], rows[~successes[rows]]
        take_good = min(group_size // 2, good.size)
        take_bad = min(group_size - take_good, bad.size)
        take_good = min(group_size - take_bad, good.size)  # fill from the other side
        chosen[good[:take_good]] = True
        chosen[bad[:take_bad]] = True
    return chosen
