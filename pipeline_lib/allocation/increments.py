"""The largest marginal gains of many concave items, by a threshold search in O(M) memory.

Private machinery of the solver (see the package docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

# Bisection stops once the undecided increments fit in this many candidates,
# which are then ranked exactly by sorting.
_MAX_CANDIDATES = 1 << 20
# The dense path first ranks this many increments per item (see `_take_best_dense`).
_FIRST_COLUMNS = 24


@dataclass(frozen=True)
class _Increments:
    """Marginal gains (per unit weight) of the valued items (0 < p < 1), evaluated lazily.

    Item i may receive up to `capacity[i]` increments on top of `start[i]`
    rollouts; its k-th increment (k = 0, 1, ...) is worth
    dV(start + k, p) / weight, or `head[i, k]` for k < head.shape[1] where given.
    With `info_gain=False` the value is P(both outcomes) alone: dV / (p (1-p)^2),
    a positive factor per item, so every bound below still holds.
    The caller guarantees the gains are non-increasing in k.
    """

    p: np.ndarray
    start: np.ndarray
    capacity: np.ndarray
    weight: np.ndarray
    head: np.ndarray | None = None  # float[items, h]: gains of the first h increments
    info_gain: bool = True

    @cached_property
    def _logs(self) -> tuple[np.ndarray, np.ndarray]:
        return np.log(self.p), np.log1p(-self.p)

    @cached_property
    def _scale(self) -> np.ndarray:
        q = 1.0 - self.p
        return (self.p * q * q if self.info_gain else np.ones_like(self.p)) / self.weight

    def gains(self, rows: np.ndarray, k: np.ndarray) -> np.ndarray:
        p = self.p[rows]
        log_p, log_q = self._logs
        n = self.start[rows] + k
        # exp(n * log p) is several times faster than p ** n on large arrays.
        gains = self._scale[rows] * (
            np.exp(n * log_p[rows]) * (1.0 - p) + np.exp(n * log_q[rows]) * p
        )
        if self.head is not None:
            first = k < self.head.shape[1]
            gains = np.where(first, self.head[rows, np.where(first, k, 0)], gains)
        return gains

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
        if self.head is not None:
            h = min(self.head.shape[1], k_max)
            grid[:h] = self.head[:, :h].T
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
        lo, hi = lo.astype(np.int64), np.nan_to_num(hi, nan=0.0).astype(np.int64)
        if self.head is not None:
            # Replacing the first h gains (monotone either way) moves the count
            # within [0, max(count, h)].
            h = self.head.shape[1]
            lo, hi = np.zeros_like(lo), np.minimum(np.maximum(hi, h), self.capacity)
        return lo, hi


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
