"""Variance-proportional allocation: rollouts in proportion to sqrt(p (1 - p)).

The rule of the variance-based allocation papers (e.g. VIP, arXiv 2602.01601: its
public repository, HieuNT91/VIP at 3604dd4, holds only a README, so this follows the
paper's objective, not code): minimise the summed variance of the groups' estimates,
sum_i p_i (1 - p_i) / N_i, under the budget. That is Neyman allocation, whose continuous
optimum is N_i proportional to sqrt(p_i (1 - p_i)). Here it is solved in integers,
within the floors and the cap: the gain of one more rollout, w_i^2 / (N (N + 1)) with
w_i^2 = p_i (1 - p_i), never grows with N, so taking the largest gains first is exact.
"""

from __future__ import annotations

import numpy as np


def variance_proportional_allocate(
    success_rates: np.ndarray, total_budget: int, min_rollouts: int, max_rollouts: int
) -> np.ndarray:
    """The integer minimiser of sum_i p_i (1 - p_i) / N_i, min <= N_i <= max, sum N_i <= budget.

    Prompts at p = 0 or 1 have no variance and keep `min_rollouts`; the budget the
    valued prompts cannot take (all at the cap) is left for the caller's fallback.
    Ties go to the lower index.

    Args:
        success_rates: float[M] in [0, 1].
    Returns:
        int64[M], rollouts per prompt.
    Raises:
        ValueError: min_rollouts < 1 (a prompt's first rollout would be worth infinity),
            or a budget below M * min_rollouts.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    if min_rollouts < 1 or max_rollouts < min_rollouts:
        raise ValueError(
            "variance-proportional allocation needs 1 <= min_rollouts <= max_rollouts, got "
            f"{min_rollouts} and {max_rollouts}"
        )
    if total_budget < p.size * min_rollouts:
        raise ValueError(
            f"total_budget {total_budget} is below {p.size} prompts x min_rollouts "
            f"{min_rollouts} = {p.size * min_rollouts}"
        )
    allocation = np.full(p.size, min_rollouts, dtype=np.int64)
    variance = p * (1.0 - p)
    valued = np.flatnonzero(variance > 0)
    remaining = int(total_budget) - int(allocation.sum())
    if valued.size == 0 or remaining <= 0 or max_rollouts == min_rollouts:
        return allocation
    # Every increment N -> N + 1 of every valued prompt, largest gain first (dense: a
    # step's prompts x (N_up - N_low) entries).
    counts = np.arange(min_rollouts, max_rollouts, dtype=np.float64)
    gains = variance[valued, None] / (counts * (counts + 1.0))[None, :]
    rows = np.broadcast_to(valued[:, None], gains.shape).ravel()
    order = np.lexsort((rows, -gains.ravel()))[:remaining]
    allocation += np.bincount(rows[order], minlength=p.size)
    return allocation
