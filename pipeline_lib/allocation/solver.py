"""The Knapsack-RL optimiser: the exact optimum of sum_i V(N_i, p_i) under the budget and bounds."""

from __future__ import annotations

import numpy as np

from pipeline_lib.allocation.from_zero import _optimum_from_zero
from pipeline_lib.allocation.increments import _Increments, _top_increments, _water_fill
from pipeline_lib.allocation.value import RolloutValue


def _validate(success_rates: np.ndarray, min_rollouts: int, max_rollouts: int) -> None:
    if success_rates.ndim != 1:
        raise ValueError(f"success_rates must be 1-D, got shape {success_rates.shape}")
    if not np.all(np.isfinite(success_rates)):
        raise ValueError(
            "success_rates must be finite (NaN marks unseen prompts only in allocate_rollouts)"
        )
    if np.any((success_rates < 0) | (success_rates > 1)):
        raise ValueError("success_rates must lie in [0, 1]")
    if min_rollouts < 0 or max_rollouts < min_rollouts:
        raise ValueError(
            f"need 0 <= min_rollouts <= max_rollouts, got {min_rollouts} and {max_rollouts}"
        )


def knapsack_allocate(
    success_rates: np.ndarray,
    total_budget: int,
    min_rollouts: int,
    max_rollouts: int,
    *,
    value: RolloutValue = "info_gain",
) -> np.ndarray:
    """The exact maximiser of sum_i V(N_i, p_i) with min <= N_i <= max, sum N_i <= budget.

    Increments of positive value are taken largest first (min_rollouts = 0 is
    solved by `_optimum_from_zero`, V not being concave from 0); any budget left after
    them (prompts with p in {0, 1}, or every valued prompt at `max_rollouts`) is
    spread evenly over the prompts still below `max_rollouts`, so the result
    spends min(total_budget, M * max_rollouts) and a budget above M * max gives
    every prompt `max_rollouts`. Deterministic: ties go to the lower index.

    `value="gradient"` (an ablation) maximises sum_i P(N_i, p_i) instead, the
    expected number of prompts with a non-zero gradient; P is concave from N = 1
    on as V is, so the same greedy is exact. It needs min_rollouts >= 1.

    Args:
        success_rates: float[M] in [0, 1].
        total_budget: rollouts to spend in total.
    Returns:
        int64[M], rollouts per prompt.
    Raises:
        ValueError: budget below M * min_rollouts, or invalid rates or bounds.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    _validate(p, min_rollouts, max_rollouts)
    if value not in ("info_gain", "gradient"):
        raise ValueError(f"unknown rollout value {value!r}: use 'info_gain' or 'gradient'")
    if value == "gradient" and min_rollouts < 1:
        raise ValueError("value='gradient' needs min_rollouts >= 1")
    num_prompts = p.size
    if total_budget < num_prompts * min_rollouts:
        raise ValueError(
            f"total_budget {total_budget} is below {num_prompts} prompts x min_rollouts "
            f"{min_rollouts} = {num_prompts * min_rollouts}"
        )
    allocation = np.full(num_prompts, min_rollouts, dtype=np.int64)
    upper = np.full(num_prompts, max_rollouts, dtype=np.int64)
    valued = np.flatnonzero((p > 0) & (p < 1))
    remaining = int(total_budget) - int(allocation.sum())
    if min_rollouts == 0 and valued.size:
        allocation[valued] = _optimum_from_zero(p[valued], remaining, max_rollouts)
        remaining = int(total_budget) - int(allocation.sum())
    elif valued.size and remaining > 0 and max_rollouts > min_rollouts:
        inc = _Increments(
            p=p[valued],
            start=np.full(valued.size, float(min_rollouts)),
            capacity=np.full(valued.size, max_rollouts - min_rollouts, dtype=np.int64),
            weight=np.ones(valued.size),
            info_gain=value == "info_gain",
        )
        allocation[valued] += _top_increments(inc, remaining)
        remaining = int(total_budget) - int(allocation.sum())
    return _water_fill(allocation, upper, remaining)


def knapsack_allocate_tokens(
    success_rates: np.ndarray,
    tokens_per_rollout: np.ndarray,
    token_budget: float,
    min_rollouts: int,
    max_rollouts: int,
) -> np.ndarray:
    """Knapsack with weights: budget and costs in expected response tokens.

    Maximises sum_i V(N_i, p_i) subject to sum_i N_i * c_i <= token_budget by
    taking increments in order of value per token (greedy). Because every item is
    concave from N = 1 on, the result is within one increment's value of the
    optimum: OPT - value <= max_i dV(N_low, p_i), the largest single marginal gain.
    min_rollouts = 0 is rejected: the first rollout is worth nothing, so the
    items are not concave and the bound would not hold.
    Budget left after the valued prompts is not spent (no value to buy).

    Args:
        success_rates: float[M] in [0, 1].
        tokens_per_rollout: float[M] > 0, expected tokens of one rollout of each prompt.
    Returns:
        int64[M], rollouts per prompt.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    cost = np.asarray(tokens_per_rollout, dtype=np.float64)
    _validate(p, min_rollouts, max_rollouts)
    if cost.shape != p.shape or np.any(~np.isfinite(cost)) or np.any(cost <= 0):
        raise ValueError("tokens_per_rollout must be positive, finite, one per prompt")
    if min_rollouts < 1:
        raise ValueError(
            "knapsack_allocate_tokens needs min_rollouts >= 1: V(0) = V(1) = 0 makes the "
            "first rollout worthless, so the greedy's one-increment bound fails from 0"
        )
    floor_cost = float((cost * min_rollouts).sum())
    if token_budget < floor_cost:
        raise ValueError(
            f"token_budget {token_budget} is below the cost of min_rollouts "
            f"{min_rollouts} for every prompt ({floor_cost:.0f} tokens)"
        )
    allocation = np.full(p.size, min_rollouts, dtype=np.int64)
    valued = np.flatnonzero((p > 0) & (p < 1))
    if valued.size and max_rollouts > min_rollouts:
        inc = _Increments(
            p=p[valued],
            start=np.full(valued.size, float(min_rollouts)),
            capacity=np.full(valued.size, max_rollouts - min_rollouts, dtype=np.int64),
            weight=cost[valued],
        )
        allocation[valued] += _top_increments(inc, token_budget - floor_cost)
    return allocation
