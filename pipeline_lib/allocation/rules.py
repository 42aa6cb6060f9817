"""The whole allocation policy: this project's exact rules (the default), and the entry
point that dispatches to the official rules (`official.py`)."""

from __future__ import annotations

import numpy as np

from pipeline_lib.allocation.estimates import _fallback_need
from pipeline_lib.allocation.increments import _water_fill
from pipeline_lib.allocation.official import _allocate_official
from pipeline_lib.allocation.proportional import variance_proportional_allocate
from pipeline_lib.allocation.solver import knapsack_allocate, knapsack_allocate_tokens
from pipeline_lib.allocation.value import (
    AllocationResult,
    AllocationRules,
    AllocationStrategy,
    CostEstimate,
    RolloutValue,
    uniform_allocate,
)


def _check_choices(strategy: str, rules: str, cost_estimate: str, value: str) -> None:
    if strategy != "knapsack":
        raise ValueError(f"unknown allocation strategy {strategy!r}: use 'knapsack' or 'uniform'")
    if rules not in ("exact", "official"):
        raise ValueError(f"unknown allocation rules {rules!r}: use 'exact' or 'official'")
    if rules == "official" and value != "info_gain":
        raise ValueError("the official rules value rollouts by V only (value='info_gain')")
    if cost_estimate not in ("confidence", "expectation"):
        raise ValueError(
            f"unknown cost_estimate {cost_estimate!r}: use 'confidence' or 'expectation'"
        )


def allocate_rollouts(
    success_rates: np.ndarray,
    total_budget: int,
    *,
    strategy: AllocationStrategy = "knapsack",
    rules: AllocationRules = "exact",
    min_rollouts: int = 2,
    max_rollouts: int = 128,
    unseen_rollouts: int = 8,
    solved_rollouts: int | None = None,
    negative_rollouts: int | None = None,
    positive_rollouts: int | None = None,
    fallback_confidence: float | None = 0.9,
    cost_estimate: CostEstimate = "confidence",
    value: RolloutValue = "info_gain",
) -> AllocationResult:
    """The paper's full allocation policy over one step's prompts.

    NaN marks a prompt with no valid estimate: never seen, or (official rule)
    seen with fewer than `min_buffer_length` rewards; the status estimator
    decides that, e.g. with `invalidate_short_histories`. Both rule sets:

    - NaN: `unseen_rollouts` (the paper's N_avg).
    - p = 0: `negative_rollouts`, p = 1: `positive_rollouts` (default
      `solved_rollouts`, whose default is `min_rollouts`).
    - 0 < p < 1: `min_rollouts` plus the optimiser's share.

    `rules="exact"` (default): the knapsack optimum of the true objective over
    the valued prompts. Fallback: if they need fewer rollouts than they are
    offered -- need per prompt the cost estimate rounded up and clipped to
    [min, max] -- the surplus goes to the p = 0 prompts (exploration of hard
    prompts), or to p = 1 prompts when there are none. Budget the valued prompts
    cannot absorb goes the same way, so the result spends exactly `total_budget`
    whenever M * max_rollouts >= total_budget.

    `rules="official"`: the released code's rules, step by step in the module
    docstring; the result always spends exactly `total_budget`.

    `fallback_confidence=None` turns the fallback off; `cost_estimate` picks the
    need estimate ("confidence": log(1 - alpha) / log(max(p, 1 - p)) with alpha =
    `fallback_confidence`; "expectation": 1 / (p (1 - p)) - 1). `value` is what
    the optimiser maximises (`knapsack_allocate`); "gradient" needs the exact rules;
    "variance" replaces the optimiser by `variance_proportional_allocate` (rollouts in
    proportion to sqrt(p (1 - p)), the `variance-proportional` strategy).

    Args:
        success_rates: float[M], NaN for unseen or not-yet-valid prompts.
    Returns:
        AllocationResult with int64[M] rollouts.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    if strategy == "uniform":
        return AllocationResult(uniform_allocate(p.size, total_budget), 0, 0)
    _check_choices(strategy, rules, cost_estimate, value)
    solved_rollouts = min_rollouts if solved_rollouts is None else solved_rollouts
    negative_rollouts, positive_rollouts = (
        solved_rollouts if n is None else n for n in (negative_rollouts, positive_rollouts)
    )
    if rules == "official":
        return _allocate_official(
            p,
            int(total_budget),
            low=min_rollouts,
            high=max_rollouts,
            unseen=unseen_rollouts,
            negative=negative_rollouts,
            positive=positive_rollouts,
            confidence=fallback_confidence,
            cost_estimate=cost_estimate,
        )
    unseen, unsolved, solved = np.isnan(p), p == 0, p == 1
    valued = ~(unseen | unsolved | solved)
    allocation = np.zeros(p.size, dtype=np.int64)
    allocation[unseen] = unseen_rollouts
    allocation[unsolved] = negative_rollouts
    allocation[solved] = positive_rollouts
    allocation[valued] = min_rollouts
    available = int(total_budget) - int(allocation.sum()) + int(valued.sum()) * min_rollouts
    if available < int(valued.sum()) * min_rollouts:
        raise ValueError(
            f"total_budget {total_budget} cannot cover the floors: {int(unseen.sum())} unseen "
            f"x {unseen_rollouts}, {int(unsolved.sum())} unsolved x {negative_rollouts}, "
            f"{int(solved.sum())} solved x {positive_rollouts}, "
            f"{int(valued.sum())} others x {min_rollouts}"
        )

    knapsack_budget = available
    if fallback_confidence is not None and valued.any():
        need = _fallback_need(
            p[valued], fallback_confidence, cost_estimate, min_rollouts, max_rollouts
        )
        knapsack_budget = min(available, need)
    if valued.any():
        allocation[valued] = _optimise(
            p[valued], knapsack_budget, min_rollouts, max_rollouts, value
        )
    surplus = int(total_budget) - int(allocation.sum())
    moved = 0
    for receivers in (unsolved, solved, valued, unseen):
        if surplus <= 0:
            break
        idx = np.flatnonzero(receivers)
        if idx.size == 0:
            continue
        upper = np.full(idx.size, max(max_rollouts, int(allocation[idx].max())), dtype=np.int64)
        filled = _water_fill(allocation[idx], upper, surplus)
        given = int((filled - allocation[idx]).sum())
        allocation[idx] = filled
        surplus -= given
        if receivers is unsolved or receivers is solved:
            moved += given
    return AllocationResult(allocation, moved, knapsack_budget)


def _optimise(p: np.ndarray, budget: int, low: int, high: int, value: RolloutValue) -> np.ndarray:
    """The valued prompts' rollouts: the knapsack optimum of `value`, or (value "variance")
    the variance-proportional allocation."""
    if value == "variance":
        return variance_proportional_allocate(p, budget, low, high)
    return knapsack_allocate(p, budget, low, high, value=value)


def allocate_rollouts_by_tokens(
    success_rates: np.ndarray,
    tokens_per_rollout: np.ndarray,
    token_budget: float,
    *,
    min_rollouts: int = 2,
    max_rollouts: int = 128,
    unseen_rollouts: int = 8,
) -> AllocationResult:
    """The allocation policy with a budget in expected completion tokens.

    - NaN success rate (unseen or not yet valid): `unseen_rollouts`.
    - p = 0 and p = 1: `min_rollouts`.
    - 0 < p < 1: `knapsack_allocate_tokens` over the tokens left, so a prompt whose
      answers are long pays for each rollout in tokens, and value per token decides.
    No fallback: tokens the valued prompts cannot use stay unspent (and are reported
    as the difference between `token_budget` and what the allocation costs).

    Args:
        success_rates: float[M], NaN for unseen prompts.
        tokens_per_rollout: float[M] > 0, expected completion tokens of one rollout.
    Returns:
        AllocationResult with int64[M] rollouts; `knapsack_budget` is the valued
        prompts' rollouts.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    cost = np.asarray(tokens_per_rollout, dtype=np.float64)
    if cost.shape != p.shape:
        raise ValueError(f"tokens_per_rollout shape {cost.shape} != success_rates {p.shape}")
    unseen = np.isnan(p)
    valued = ~unseen & (p > 0) & (p < 1)
    allocation = np.full(p.size, min_rollouts, dtype=np.int64)
    allocation[unseen] = unseen_rollouts
    fixed_cost = float((allocation[~valued] * cost[~valued]).sum())
    if valued.any():
        allocation[valued] = knapsack_allocate_tokens(
            p[valued], cost[valued], token_budget - fixed_cost, min_rollouts, max_rollouts
        )
    return AllocationResult(allocation, 0, int(allocation[valued].sum()))
