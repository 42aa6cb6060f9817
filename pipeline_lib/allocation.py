"""Rollout-budget allocation: the Knapsack-RL optimiser and the paper's policy on top of it.

A prompt with success rate p given N rollouts is worth

    V(N, p) = (1 - p^N - (1-p)^N) * p * (1-p)^2

(probability that its GRPO group holds both outcomes, times the expected gain in
success probability). V is concave in N: the marginal gain of the (N+1)-th rollout,

    dV(N, p) = p (1-p)^2 * (p^N (1-p) + (1-p)^N p),

never grows with N. So taking the largest marginal gains first is exactly optimal
and the paper's O(M * B * N_up) dynamic program is not needed. We find the
threshold gain by bisection instead of sorting all M * (N_up - N_low) increments,
which keeps memory O(M) (100,000 prompts with N_up = 256 in well under a second).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

import numpy as np

AllocationStrategy = Literal["knapsack", "uniform"]

# Bisection stops once the undecided increments fit in this many candidates,
# which are then ranked exactly by sorting.
_MAX_CANDIDATES = 1 << 20
# The dense path first ranks this many increments per item (see `_take_best_dense`).
_FIRST_COLUMNS = 24


def rollout_value(num_rollouts: np.ndarray, success_rates: np.ndarray) -> np.ndarray:
    """V(N, p) elementwise: P(group has both outcomes) * InfoGain(p)."""
    n = np.asarray(num_rollouts, dtype=np.float64)
    p = np.asarray(success_rates, dtype=np.float64)
    q = 1.0 - p
    return (1.0 - p**n - q**n) * p * q**2


def marginal_gain(num_rollouts: np.ndarray, success_rates: np.ndarray) -> np.ndarray:
    """V(N + 1, p) - V(N, p) elementwise, in the closed form that is monotone in N."""
    n = np.asarray(num_rollouts, dtype=np.float64)
    p = np.asarray(success_rates, dtype=np.float64)
    q = 1.0 - p
    return p * q**2 * (p**n * q + q**n * p)


@dataclass(frozen=True)
class _Increments:
    """Marginal gains (per unit weight) of the valued items (0 < p < 1), evaluated lazily.

    Item i may receive up to `capacity[i]` increments on top of `start[i]`
    rollouts; its k-th increment (k = 0, 1, ...) is worth
    dV(start + k, p) / weight, non-increasing in k.
    """

    p: np.ndarray
    start: np.ndarray
    capacity: np.ndarray
    weight: np.ndarray

    @cached_property
    def _logs(self) -> tuple[np.ndarray, np.ndarray]:
        return np.log(self.p), np.log1p(-self.p)

    @cached_property
    def _scale(self) -> np.ndarray:
        q = 1.0 - self.p
        return self.p * q * q / self.weight

    def gains(self, rows: np.ndarray, k: np.ndarray) -> np.ndarray:
        p = self.p[rows]
        log_p, log_q = self._logs
        n = self.start[rows] + k
        # exp(n * log p) is several times faster than p ** n on large arrays.
        return self._scale[rows] * (
            np.exp(n * log_p[rows]) * (1.0 - p) + np.exp(n * log_q[rows]) * p
        )

    def all_gains(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every increment as (rows, k, gains), ordered by k and then by row.

        Powers come from running products down the k axis (vectorised over items),
        several times cheaper than exponentials on the whole grid.
        """
        k_max = int(self.capacity.max())
        q = 1.0 - self.p
        steps_p = np.broadcast_to(self.p, (k_max, self.p.size)).copy()
        steps_q = np.broadcast_to(q, (k_max, self.p.size)).copy()
        steps_p[0] = self.p**self.start
        steps_q[0] = q**self.start
        grid = self._scale * (
            np.cumprod(steps_p, axis=0) * q + np.cumprod(steps_q, axis=0) * self.p
        )
        if np.all(self.capacity == k_max):
            rows = np.tile(np.arange(self.p.size), k_max)
            return rows, np.repeat(np.arange(k_max), self.p.size), grid.ravel()
        k, rows = np.nonzero(np.arange(k_max)[:, None] < self.capacity[None, :])
        return rows, k, grid[k, rows]

    def count_above(self, threshold: float) -> np.ndarray:
        """Per item, how many increments have gain strictly above `threshold` (> 0)."""
        lo, hi = self._count_bracket(threshold)
        rows = np.flatnonzero(lo < hi)
        # Vectorised bisection over k for the items whose bracket is not yet tight.
        while rows.size:
            mid = (lo[rows] + hi[rows]) // 2
            above = self.gains(rows, mid) > threshold
            lo[rows] = np.where(above, mid + 1, lo[rows])
            hi[rows] = np.where(above, hi[rows], mid)
            rows = rows[lo[rows] < hi[rows]]
        return lo

    def _count_bracket(self, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Bounds on count_above from m^N (1-m) <= dV / (p q^2) <= 2 m^N (1-m), m = max(p, q).

        The upper bound needs N >= 1, so items starting at 0 rollouts keep the full range.
        """
        log_p, log_q = self._logs
        log_m = np.maximum(log_p, log_q)
        base = np.log(self._scale) + np.log1p(-np.exp(log_m))  # log(w (1 - m) / weight)
        with np.errstate(divide="ignore", invalid="ignore"):
            first_not_above = (np.log(threshold) - base) / log_m  # solves w(1-m) m^N = t
            last_above = (np.log(threshold / 2.0) - base) / log_m
        lo = np.clip(np.ceil(first_not_above - self.start) - 1, 0, self.capacity)
        hi = np.clip(np.floor(last_above - self.start) + 1, 0, self.capacity)
        hi = np.where(self.start >= 1, hi, self.capacity)
        lo = np.minimum(np.nan_to_num(lo, nan=0.0), hi)
        return lo.astype(np.int64), np.nan_to_num(hi, nan=0.0).astype(np.int64)


def _sample_threshold(inc: _Increments, budget: float, sample_size: int = 4096) -> float:
    """Estimate the gain threshold that spends `budget`, from a sample of items."""
    rows = np.unique(np.linspace(0, inc.p.size - 1, min(sample_size, inc.p.size)).astype(np.int64))
    k_max = int(inc.capacity[rows].max())
    k = np.arange(k_max)
    grid_rows = np.repeat(rows, k_max)
    grid_k = np.tile(k, rows.size)
    keep = grid_k < inc.capacity[grid_rows]
    gains = inc.gains(grid_rows[keep], grid_k[keep])
    weights = inc.weight[grid_rows[keep]] * (inc.p.size / rows.size)
    order = np.argsort(-gains)
    spent = np.cumsum(weights[order])
    position = min(int(np.searchsorted(spent, budget)), order.size - 1)
    return float(gains[order][position])


def _top_increments(inc: _Increments, budget: float) -> np.ndarray:
    """Increments per item maximising total gain with total weight <= budget.

    Takes increments in order of gain per unit weight. With unit weights this is
    exactly optimal (concave items); with other weights it is the greedy
    knapsack solution, within one increment's value of the optimum.
    """

    def weight_of(counts: np.ndarray) -> float:
        return float(np.dot(counts, inc.weight))

    if weight_of(inc.capacity) <= budget:
        return inc.capacity.copy()
    if int(inc.capacity.sum()) <= _MAX_CANDIDATES:  # small enough to rank every increment
        return _take_best_dense(inc, budget)
    # Bracket the threshold around a sampled estimate, widening until it holds:
    # everything above `hi` fits the budget, everything above `lo` does not.
    estimate = _sample_threshold(inc, budget)
    lo, hi = estimate * 0.98, estimate * 1.02
    counts_lo, counts_hi = inc.count_above(lo), inc.count_above(hi)
    while weight_of(counts_hi) > budget:
        lo, counts_lo, hi = hi, counts_hi, hi * 2.0
        counts_hi = inc.count_above(hi)
    while weight_of(counts_lo) <= budget and lo > 0.0:
        hi, counts_hi = lo, counts_lo
        lo = lo / 2.0 if lo > 1e-300 else 0.0
        counts_lo = inc.count_above(lo) if lo > 0.0 else inc.capacity.copy()
    # Narrow by bisection on the float64 bit pattern (ordered like non-negative
    # values) until the undecided increments are few enough to rank exactly.
    lo_bits = int(np.float64(lo).view(np.int64))
    hi_bits = int(np.float64(hi).view(np.int64))
    while hi_bits - lo_bits > 1 and int(counts_lo.sum() - counts_hi.sum()) > _MAX_CANDIDATES:
        mid_bits = (lo_bits + hi_bits) // 2
        counts_mid = inc.count_above(float(np.int64(mid_bits).view(np.float64)))
        if weight_of(counts_mid) <= budget:
            hi_bits, counts_hi = mid_bits, counts_mid
        else:
            lo_bits, counts_lo = mid_bits, counts_mid

    return counts_hi + _take_best(
        inc, counts_hi, counts_lo - counts_hi, budget - weight_of(counts_hi)
    )


def _take_best_dense(inc: _Increments, budget: float) -> np.ndarray:
    """Rank every increment, trying the first `_FIRST_COLUMNS` of each item first.

    Most items take a few increments, so ranking only the first columns is usually
    enough; it is provably the full answer when every item cut off there has its
    next increment worth no more than the weakest one taken (gains never rise
    with k, and ties go to lower k first). Otherwise rank the full grid.
    """
    zeros = np.zeros_like(inc.capacity)
    unit = bool(np.all(inc.weight == 1.0))
    if unit and int(inc.capacity.max()) > _FIRST_COLUMNS:
        cut = replace(inc, capacity=np.minimum(inc.capacity, _FIRST_COLUMNS))
        counts = _take_best(cut, zeros, cut.capacity, budget)
        if int(counts.sum()) == int(budget + 1e-9):
            taken = np.flatnonzero(counts > 0)
            weakest = inc.gains(taken, counts[taken] - 1).min() if taken.size else np.inf
            clipped = np.flatnonzero((counts == _FIRST_COLUMNS) & (inc.capacity > _FIRST_COLUMNS))
            if not clipped.size or inc.gains(clipped, counts[clipped]).max() <= weakest:
                return counts
    return _take_best(inc, zeros, inc.capacity, budget)


def _take_best(
    inc: _Increments, already: np.ndarray, undecided: np.ndarray, budget: float
) -> np.ndarray:
    """Rank the undecided increments exactly; return how many each item gets within `budget`."""
    if not already.any() and np.array_equal(undecided, inc.capacity):
        rows, k, gains = inc.all_gains()
    else:
        rows = np.repeat(np.arange(inc.p.size), undecided)
        offsets = np.arange(rows.size) - np.repeat(np.cumsum(undecided) - undecided, undecided)
        k = already[rows] + offsets
        gains = inc.gains(rows, k)
    if np.all(inc.weight == 1.0):
        wanted = int(budget + 1e-9)
        if wanted >= rows.size:
            return undecided.copy()
        # The wanted-th largest gain; ties at it are taken in the order given (k
        # ascending within each row), which keeps every item's increments a
        # prefix. O(n) selection, no sort.
        cutoff = np.partition(gains, rows.size - wanted)[rows.size - wanted]
        taken = gains > cutoff
        ties = np.flatnonzero(gains == cutoff)
        taken[ties[: wanted - int(taken.sum())]] = True
        return np.bincount(rows[taken], minlength=inc.p.size)

    # Weighted: best ratio first (ties by item then k); after the first increment
    # that does not fit, keep adding later ones that still do (greedy knapsack).
    order = np.lexsort((k, rows, -gains))
    rows, cost = rows[order], inc.weight[rows[order]]
    taken = np.cumsum(cost) <= budget + 1e-9
    first_miss = int(np.argmin(taken)) if not taken.all() else rows.size
    left = budget - float(cost[:first_miss].sum())
    for j in range(first_miss, rows.size):
        taken[j] = cost[j] <= left + 1e-9
        if taken[j]:
            left -= cost[j]
    return np.bincount(rows[taken], minlength=inc.p.size)


def _water_fill(current: np.ndarray, upper: np.ndarray, amount: int) -> np.ndarray:
    """Add `amount` units as evenly as possible without passing `upper`.

    Raises the lowest items first to a common level; the last few units go to the
    lowest-index items at that level. Returns `upper` when the amount exceeds the room.
    """
    if amount <= 0:
        return current.copy()
    if amount >= int((upper - current).sum()):
        return upper.copy()
    # Largest level L with sum(clip(L - current, 0, upper - current)) <= amount.
    lo, hi = int(current.min()), int(upper.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.clip(mid - current, 0, upper - current).sum()) <= amount:
            lo = mid
        else:
            hi = mid - 1
    filled = np.maximum(current, np.minimum(lo, upper))
    left = amount - int((filled - current).sum())
    # Fewer units than items still at the level with room (else L was not maximal).
    at_level = np.flatnonzero((filled == lo) & (filled < upper))
    filled[at_level[:left]] += 1
    return filled


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
) -> np.ndarray:
    """The exact maximiser of sum_i V(N_i, p_i) with min <= N_i <= max, sum N_i <= budget.

    Increments of positive value are taken largest first; any budget left after
    them (prompts with p in {0, 1}, or every valued prompt at `max_rollouts`) is
    spread evenly over the prompts still below `max_rollouts`, so the result
    spends min(total_budget, M * max_rollouts) and a budget above M * max gives
    every prompt `max_rollouts`. Deterministic: ties go to the lower index.

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
    if valued.size and remaining > 0 and max_rollouts > min_rollouts:
        inc = _Increments(
            p=p[valued],
            start=np.full(valued.size, float(min_rollouts)),
            capacity=np.full(valued.size, max_rollouts - min_rollouts, dtype=np.int64),
            weight=np.ones(valued.size),
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
    concave, the result is within one increment's value of the optimum:
    OPT - value <= max_i dV(N_low, p_i), the largest single marginal gain.
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


def rollouts_for_confidence(success_rates: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    """Rollouts needed to see the minority outcome with probability `confidence`.

    The paper's cost estimate log(1 - alpha) / log(max(p, 1 - p)), for 0 < p < 1.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    return np.log(1.0 - confidence) / np.log(np.maximum(p, 1.0 - p))


@dataclass(frozen=True)
class AllocationResult:
    """Rollouts per prompt and what the policy did to get them."""

    rollouts: np.ndarray  # int64[M]
    fallback_rollouts: int  # rollouts moved to p = 0 (or p = 1) prompts by the fallback
    knapsack_budget: int  # rollouts the optimiser distributed over 0 < p < 1 prompts


def uniform_allocate(num_prompts: int, total_budget: int) -> np.ndarray:
    """The baseline: the budget split as evenly as possible, lower indices first."""
    base, extra = divmod(int(total_budget), num_prompts)
    allocation = np.full(num_prompts, base, dtype=np.int64)
    allocation[:extra] += 1
    return allocation


def allocate_rollouts(
    success_rates: np.ndarray,
    total_budget: int,
    *,
    strategy: AllocationStrategy = "knapsack",
    min_rollouts: int = 2,
    max_rollouts: int = 128,
    unseen_rollouts: int = 8,
    solved_rollouts: int | None = None,
    fallback_confidence: float | None = 0.9,
) -> AllocationResult:
    """The paper's full allocation policy over one step's prompts.

    - NaN success rate (never seen): `unseen_rollouts` (the paper's N_avg).
    - p = 0 and p = 1 (no value): `solved_rollouts` (default `min_rollouts`).
    - 0 < p < 1: the knapsack optimum over what is left.
    - Fallback (paper's code): if those valued prompts need fewer rollouts than
      they are offered -- need estimated per prompt as `rollouts_for_confidence`
      clipped to [min, max] -- the surplus goes to the p = 0 prompts
      (exploration of hard prompts), or to p = 1 prompts when there are none.
    Budget the valued prompts cannot absorb goes the same way, so the result
    spends exactly `total_budget` whenever M * max_rollouts >= total_budget.

    Args:
        success_rates: float[M], NaN for unseen prompts.
    Returns:
        AllocationResult with int64[M] rollouts.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    if strategy == "uniform":
        return AllocationResult(uniform_allocate(p.size, total_budget), 0, 0)
    if strategy != "knapsack":
        raise ValueError(f"unknown allocation strategy {strategy!r}: use 'knapsack' or 'uniform'")
    solved_rollouts = min_rollouts if solved_rollouts is None else solved_rollouts
    unseen = np.isnan(p)
    unsolved = p == 0
    solved = p == 1
    valued = ~(unseen | unsolved | solved)

    allocation = np.zeros(p.size, dtype=np.int64)
    allocation[unseen] = unseen_rollouts
    allocation[unsolved | solved] = solved_rollouts
    allocation[valued] = min_rollouts
    available = int(total_budget) - int(allocation.sum()) + int(valued.sum()) * min_rollouts
    if available < int(valued.sum()) * min_rollouts:
        raise ValueError(
            f"total_budget {total_budget} cannot cover the floors: {int(unseen.sum())} unseen "
            f"x {unseen_rollouts}, {int((unsolved | solved).sum())} solved/unsolved x "
            f"{solved_rollouts}, {int(valued.sum())} others x {min_rollouts}"
        )

    knapsack_budget = available
    if fallback_confidence is not None and valued.any():
        need = np.clip(
            np.ceil(rollouts_for_confidence(p[valued], fallback_confidence)),
            min_rollouts,
            max_rollouts,
        )
        knapsack_budget = min(available, int(need.sum()))
    if valued.any():
        allocation[valued] = knapsack_allocate(
            p[valued], knapsack_budget, min_rollouts, max_rollouts
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
