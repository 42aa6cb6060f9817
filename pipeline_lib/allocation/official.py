"""The paper code's allocation rules (liziniu/KnapsackRL), `rules="official"`."""

from __future__ import annotations

import numpy as np

from pipeline_lib.allocation.estimates import estimated_rollouts
from pipeline_lib.allocation.from_zero import _optimum_from_zero
from pipeline_lib.allocation.increments import _Increments, _top_increments, _water_fill
from pipeline_lib.allocation.solver import _validate
from pipeline_lib.allocation.value import (
    AllocationResult,
    CostEstimate,
    rollout_value,
    uniform_allocate,
)


def official_extra_rollouts(
    success_rates: np.ndarray, total_budget: int, min_rollouts: int, max_rollouts: int
) -> np.ndarray:
    """The official DP's optimum: extra rollouts per effective prompt (0 < p < 1).

    Maximises sum_i f_i(k_i), f_i(0) = 0, f_i(k) = V(min_rollouts + k, p_i) for
    k >= 1, over 0 <= k_i <= max_rollouts - min_rollouts with
    sum_i k_i = min(total_budget, M * (max_rollouts - min_rollouts)). f is concave
    for min_rollouts >= 1 (its first gain V(N_low + 1) >= 2 dV(N_low + 1)): greedy
    with that first gain. For min_rollouts = 0, f = V: `_optimum_from_zero`.

    Returns:
        int64[M], k_i (the caller adds min_rollouts).
    """
    p = np.asarray(success_rates, dtype=np.float64)
    _validate(p, min_rollouts, max_rollouts)
    if np.any((p <= 0) | (p >= 1)):
        raise ValueError("official_extra_rollouts takes effective prompts only (0 < p < 1)")
    room = max_rollouts - min_rollouts
    extra = np.zeros(p.size, dtype=np.int64)
    if total_budget <= 0 or room == 0 or p.size == 0:
        return extra
    if min_rollouts == 0:
        extra = _optimum_from_zero(p, int(total_budget), room)
        # The official DP spends exactly what fits; more rollouts never lower V.
        fits = min(int(total_budget), p.size * room)
        return _water_fill(extra, np.full(p.size, room, dtype=np.int64), fits - int(extra.sum()))
    inc = _Increments(
        p=p,
        start=np.full(p.size, float(min_rollouts)),
        capacity=np.full(p.size, room, dtype=np.int64),
        weight=np.ones(p.size),
        head=rollout_value(min_rollouts + 1, p)[:, None],
    )
    return _top_increments(inc, int(total_budget))


def _allocate_official(
    p: np.ndarray,
    total_budget: int,
    *,
    low: int,
    high: int,
    unseen: int,
    negative: int,
    positive: int,
    confidence: float | None,
    cost_estimate: CostEstimate,
) -> AllocationResult:
    """`allocate_rollouts(rules="official")`: steps 1-6 of the module docstring."""
    if p.ndim != 1:
        raise ValueError(f"success_rates must be 1-D, got shape {p.shape}")
    if np.any(np.isinf(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("success_rates must lie in [0, 1] (NaN for unseen prompts)")
    if low < 0 or high < low or min(unseen, negative, positive) < 0:
        raise ValueError(
            f"need 0 <= min_rollouts <= max_rollouts and non-negative floors, got min {low}, "
            f"max {high}, unseen {unseen}, negative {negative}, positive {positive}"
        )
    effective = (p > 0) & (p < 1)
    zero = (p == 0) | np.isnan(p)  # the official code records an invalid prompt's rate as 0
    allocation = np.select(
        [effective, p == 0, p == 1], [low, negative, positive], default=unseen
    ).astype(np.int64)
    left = total_budget - int(allocation.sum())
    if left < 0:
        raise ValueError(
            f"total_budget {total_budget} cannot cover the floors (sum {int(allocation.sum())}): "
            f"{int(np.isnan(p).sum())} unseen x {unseen}, {int((p == 0).sum())} p = 0 x "
            f"{negative}, {int((p == 1).sum())} p = 1 x {positive}, "
            f"{int(effective.sum())} others x {low}"
        )
    if not effective.any():
        if left > 0 and zero.any():
            allocation[zero] += uniform_allocate(int(zero.sum()), left)
        elif left > 0:  # every prompt has p = 1: official gives each N_avg (= budget / M)
            allocation = uniform_allocate(p.size, total_budget)
        return AllocationResult(allocation, left, 0)

    knapsack_budget, moved = left, 0
    receivers = zero if zero.any() else ~effective
    if confidence is not None and receivers.any():
        cost = estimated_rollouts(p[effective], confidence, cost_estimate)
        need = int(np.floor(np.minimum(high, cost)).sum())
        if need < left:
            moved, knapsack_budget = left - need, need
            allocation[receivers] += uniform_allocate(int(receivers.sum()), moved)
    extra = official_extra_rollouts(p[effective], knapsack_budget, low, high)
    unplaced = knapsack_budget - int(extra.sum())
    if unplaced > 0:
        extra += uniform_allocate(extra.size, unplaced)
    allocation[effective] += extra
    return AllocationResult(allocation, moved, knapsack_budget + low * int(effective.sum()))
