"""What an allocation is worth: V(N, p) and its marginal gain; the result type and the
uniform baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

AllocationStrategy = Literal["knapsack", "uniform"]
AllocationRules = Literal["exact", "official"]
# What a prompt's rollouts are worth: V = P(both outcomes) * InfoGain (the paper), or
# P(both outcomes) alone (an ablation: the chance of a non-zero gradient, unweighted),
# or minus the estimate's variance p (1 - p) / N (variance-proportional allocation).
RolloutValue = Literal["info_gain", "gradient", "variance"]
CostEstimate = Literal["confidence", "expectation"]


def rollout_value(num_rollouts: np.ndarray, success_rates: np.ndarray) -> np.ndarray:
    """V(N, p) elementwise: P(group has both outcomes) * InfoGain(p); V(0) = V(1) = 0."""
    n = np.asarray(num_rollouts, dtype=np.float64)
    p = np.asarray(success_rates, dtype=np.float64)
    q = 1.0 - p
    # The closed form gives -p q^2 at N = 0; no rollouts are worth nothing.
    return np.where(n == 0, 0.0, (1.0 - p**n - q**n) * p * q**2)


def marginal_gain(num_rollouts: np.ndarray, success_rates: np.ndarray) -> np.ndarray:
    """V(N + 1, p) - V(N, p) elementwise: 0 at N = 0, a closed form non-increasing from N = 1."""
    n = np.asarray(num_rollouts, dtype=np.float64)
    p = np.asarray(success_rates, dtype=np.float64)
    q = 1.0 - p
    return np.where(n == 0, 0.0, p * q**2 * (p**n * q + q**n * p))


@dataclass(frozen=True)
class AllocationResult:
    """Rollouts per prompt and what the policy did to get them."""

    rollouts: np.ndarray  # int64[M]
    # Rollouts the fallback gave to p = 0 prompts (official: and unseen ones), or to
    # p = 1 prompts when there are none.
    fallback_rollouts: int
    knapsack_budget: int  # rollouts offered to the 0 < p < 1 prompts, floors included


def uniform_allocate(num_prompts: int, total_budget: int) -> np.ndarray:
    """The baseline: the budget split as evenly as possible, lower indices first."""
    base, extra = divmod(int(total_budget), num_prompts)
    allocation = np.full(num_prompts, base, dtype=np.int64)
    allocation[:extra] += 1
    return allocation
