"""Rollout-budget allocation: the Knapsack-RL optimiser and the paper's policy on top of it.

A prompt with success rate p given N rollouts is worth

    V(N, p) = (1 - p^N - (1-p)^N) * p * (1-p)^2      (N >= 1),   V(0, p) = 0

(probability that its GRPO group holds both outcomes, times the expected gain in
success probability; V(0) = V(1) = 0). From N = 1 on V is concave: the marginal gain

    dV(N, p) = V(N+1, p) - V(N, p) = p (1-p)^2 * (p^N (1-p) + (1-p)^N p)     (N >= 1)

never grows with N. So with min_rollouts >= 1, taking the largest marginal gains
first is exactly optimal and the paper's O(M * B * N_up) dynamic program is not
needed. We find the threshold gain by bisection instead of sorting all
M * (N_up - N_low) increments, which keeps memory O(M) (100,000 prompts with
N_up = 256 in well under a second).

min_rollouts = 0 breaks concavity at the start: the first rollout is worth 0
(the closed form above would say -p(1-p)^2 at N = 0, which made it look
valuable), the second dV(1) = 2 dV(2). `_optimum_from_zero` solves that case
exactly: V's concave envelope has slope dV(2) on [0, 3] and equals V everywhere
except at N = 1, so the greedy optimum of the envelope is optimal whenever no
prompt ends at exactly one rollout; singletons are first paired or swapped
against increments of equal gain, and if one remains, a dynamic program over the
few prompts that can differ from the greedy (a Lagrangian loss bound, see
`_pruned_dp`) finishes exactly (to float resolution).

Two rule sets for the whole policy (`allocate_rollouts(..., rules=...)`):

- `exact` (default): the optimum of the true objective above, plus this project's
  fallback. It maximises what the paper says it maximises, so it is the default.
- `official`: the rules of the paper's released code (`sampling_budget_by_knapsack`
  in its verl fork), reproduced to the integer, for comparison with the paper's runs:

  1. Floors. Effective prompt (0 < p < 1): N_low (`min_rollouts`). p = 0:
     `negative_rollouts`; p = 1: `positive_rollouts` (both default N_low).
     NaN (unseen, or fewer than `min_buffer_length` rewards, see
     `invalidate_short_histories`): N_avg (`unseen_rollouts`). R = budget - sum of
     floors; R < 0 raises (the official code fails an assertion).
  2. "Zero" prompts are p = 0 and NaN prompts: the official code records an
     invalid prompt's success rate as 0.
  3. No effective prompt and R > 0: R is split evenly over the zero prompts,
     base R // z each and one more to the first R % z in index order, no cap;
     with no zero prompt, every prompt gets N_avg (here: the budget split evenly,
     which is N_avg each whenever budget = M * N_avg, the only case the official
     code accepts).
  4. Fallback (when `fallback_confidence` is not None; the official
     `allow_fallback`). need = sum over effective prompts of
     floor(min(N_up, cost(p))), cost = log(1 - alpha) / log(max(p, 1 - p))
     (`cost_estimate="confidence"`, alpha = `fallback_confidence`) or
     1 / (p (1 - p)) - 1 (`"expectation"`); no lower clip and N_low is not added.
     If need < R, the surplus R - need is split evenly over the zero prompts (or,
     with none, over every non-effective prompt): base + one more to the first in
     index order, no N_up cap; the optimiser then gets need. (With every prompt
     effective the official code divides by zero; here the fallback is skipped.)
  5. Optimiser, with B_opt = need after a fallback, else R: effective prompt i
     gets k_i extra rollouts, 0 <= k_i <= N_up - N_low,
     sum k_i = min(B_opt, n_eff * (N_up - N_low)), maximising
     sum_i f_i(k_i) with f_i(0) = 0 and f_i(k) = V(N_low + k, p_i) for k >= 1.
     This is not the true objective: k = 0 is worth 0 rather than V(N_low), so
     the first extra rollout is worth V(N_low + 1) instead of dV(N_low) (at
     least twice the second's worth), and the DP spreads extra rollouts over
     more prompts than the true optimum does. f is still concave for
     N_low >= 1 (f(1) = V(N_low + 1) = sum_{j=1..N_low} dV(j) >= dV(N_low + 1)),
     so the greedy with that first gain is exact; for N_low = 0, f = V and
     `_optimum_from_zero` applies. Ties between equal-valued optima may be broken
     differently from the official DP; the objective is the same.
  6. Budget the optimiser cannot place (B_opt above n_eff * (N_up - N_low)) is
     split evenly over the effective prompts: base + one more to the first in
     index order, no cap.

  The official code stores rates and costs in float32; here they stay float64,
  which can only matter for a rate within float32 rounding of 0 or 1 or a cost
  within float32 rounding below an integer.

How `exact` differs: the optimiser values every prompt by V(N) (so the first
extra rollout of a prompt is worth dV(N_low), not V(N_low + 1)); the fallback's
need is ceil(cost) clipped to [N_low, N_up] per prompt and compared with the
whole budget the valued prompts are offered (floors included); its surplus is
water-filled (lowest first, capped at N_up) over p = 0 prompts, then p = 1, then
valued prompts, then unseen ones; unseen prompts are never counted as p = 0.
`scripts/bench_allocation.py` measures how far apart the two land per step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

import numpy as np

AllocationStrategy = Literal["knapsack", "uniform"]
AllocationRules = Literal["exact", "official"]
# What a prompt's rollouts are worth: V = P(both outcomes) * InfoGain (the paper), or
# P(both outcomes) alone (an ablation: the chance of a non-zero gradient, unweighted).
RolloutValue = Literal["info_gain", "gradient"]
CostEstimate = Literal["confidence", "expectation"]

# The official code's validity rule: an estimate needs at least this many rewards.
MIN_BUFFER_LENGTH = 8

# Bisection stops once the undecided increments fit in this many candidates,
# which are then ranked exactly by sorting.
_MAX_CANDIDATES = 1 << 20
# The dense path first ranks this many increments per item (see `_take_best_dense`).
_FIRST_COLUMNS = 24


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


def _optimum_from_zero(p: np.ndarray, budget: int, capacity: int) -> np.ndarray:
    """Exact argmax of sum_i V(n_i, p_i), 0 <= n_i <= capacity, sum_i n_i <= budget; 0 < p < 1.

    V(0) = V(1) = 0 and dV(1) = 2 dV(2) > dV(2) > dV(3) >= ..., so V's concave
    envelope rises with slope dV(2) on [0, min(3, capacity)], then follows V; it
    exceeds V only at n = 1. The greedy optimum of the envelope (exact: concave)
    is therefore optimal for V when no item ends at n = 1. Singletons are
    removed by swaps that keep the envelope value (pairing two singletons of
    equal gain, or trading the singleton's unit with an equal-gain single
    increment elsewhere); any left over go to `_pruned_dp`, which is exact.
    The result may leave budget unspent only when that cannot add value.
    """
    counts = np.zeros(p.size, dtype=np.int64)
    if capacity < 2 or budget < 2:
        return counts  # nothing can reach two rollouts: every allocation is worth 0
    base = _Increments(
        p=p,
        start=np.zeros(p.size),
        capacity=np.full(p.size, capacity, dtype=np.int64),
        weight=np.ones(p.size),
    )
    rows = np.arange(p.size)
    slope = base.gains(rows, np.full(p.size, 2))  # dV(2): the envelope's slope up to 3
    envelope = replace(base, head=np.repeat(slope[:, None], min(3, capacity), axis=1))
    counts = _top_increments(envelope, budget)

    def equal_gain(rows: np.ndarray, k: np.ndarray, value: float) -> np.ndarray:
        return rows[envelope.gains(rows, k) == value]

    singles = np.flatnonzero(counts == 1)
    for value in np.unique(slope[singles]):  # pair singletons of equal gain
        group = singles[slope[singles] == value]
        half = group.size // 2
        counts[group[:half]], counts[group[half : 2 * half]] = 2, 0
    for j in np.flatnonzero(counts == 1):
        rows = np.flatnonzero((counts >= 2) & (counts < capacity))
        grow = equal_gain(rows, counts[rows], slope[j])
        if grow.size:  # move j's unit onto an untaken single increment of the same gain
            counts[j], counts[grow[0]] = 0, counts[grow[0]] + 1
            continue
        rows = np.flatnonzero(counts >= 3)
        shrink = equal_gain(rows, counts[rows] - 1, slope[j])
        if shrink.size:  # complete j with a taken single increment of the same gain
            counts[j], counts[shrink[0]] = 2, counts[shrink[0]] - 1
    ones = counts == 1
    if not ones.any():
        return counts
    price = float(slope[ones].max())
    reference = np.where(ones, 0, counts)  # zero loss at this price (see `_pruned_dp`)
    if price <= 0.0:
        return reference  # the singleton's unit has no value anywhere (gains underflow)
    return _pruned_dp(p, budget, capacity, counts, reference, price)


def _pruned_dp(
    p: np.ndarray,
    budget: int,
    capacity: int,
    feasible: np.ndarray,
    reference: np.ndarray,
    price: float,
) -> np.ndarray:
    """Exact argmax of sum_i V(n_i, p_i), n_i in [0, capacity], sum n_i <= budget, by a small DP.

    For a price lambda > 0 and any allocation x with sum x_i <= budget,

        sum_i V(x_i) = sum_i best_i + lambda * budget - L(x),
        L(x) = sum_i s_i(x_i) + lambda * (budget - sum_i x_i),
        s_i(n) = best_i - (V(n, p_i) - lambda n) >= 0,  best_i = max_n V(n, p_i) - lambda n,

    so maximising value is minimising L, whose terms are all >= 0. `reference` has
    s_i(r_i) = 0 for every i (the envelope greedy at its threshold lambda, the
    singleton set to 0; where rounding says otherwise, the argmin of s_i is used),
    and value(reference) >= OPT - lambda. When lambda is below 1e-13 of the best
    single prompt's value (only when the threshold prompt's rate is extremely close
    to 0 or 1), that gap is below float resolution and the reference is returned.

    1. Bound: L(x*) <= U, the least loss of a few feasible points (`feasible`, the
       greedy with its singleton; the reference wasting its spare units; one spare
       unit on the best single increment; a new pair paid by the cheapest taken
       single). So x*_i lies in C_i = {n : s_i(n) <= U}; items with C_i = {r_i}
       are fixed.
    2. Window: let m_i = x_i - r_i, each in [-R, R] over the C_i, summing to
       D = sum x - sum r, |D| <= |budget - sum r| + U / lambda. If an optimum has
       more than 2R + |D| non-zero moves, reordering them so partial sums stay in
       [min(0, D) - R, max(0, D) + R] (Steinitz) repeats a partial sum, and undoing
       that zero-sum block keeps the total and does not raise L (s_i(r_i) = 0).
       So some optimum has at most 2R + |D| moves, and in any order its partial
       sums lie within W = (2R + |D|) R of 0: a DP over items whose state is the
       partial sum of moves, restricted to [-W, W], finds it. Prompts with equal
       rate and reference are interchangeable, so 2R + |D| of each kind suffice.
    """
    n = np.arange(capacity + 1)
    chunk = max(1, (1 << 20) // (capacity + 1))
    blocks = [np.arange(lo, min(lo + chunk, p.size)) for lo in range(0, p.size, chunk)]

    def losses(rows: np.ndarray) -> np.ndarray:
        """s_i(n) for n = 0..capacity, float[rows, capacity + 1]; powers as running products."""
        p_rows = p[rows, None]
        powers_p = np.cumprod(np.broadcast_to(p_rows, (rows.size, capacity + 1)), axis=1)
        powers_q = np.cumprod(np.broadcast_to(1.0 - p_rows, (rows.size, capacity + 1)), axis=1)
        value = (1.0 - powers_p / p_rows - powers_q / (1.0 - p_rows)) * p_rows * (1.0 - p_rows) ** 2
        value[:, 0] = 0.0
        net = value - price * n
        return net.max(axis=1, keepdims=True) - net

    def loss_at(rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        net = rollout_value(counts, p[rows]) - price * counts
        return best[rows] - net

    # value(reference) >= OPT - price (the envelope bounds OPT; the reference is the
    # envelope greedy less the singleton's unit). Below float resolution: done.
    alone = float(rollout_value(min(budget, capacity), p).max())  # feasible, so <= OPT
    if price <= 1e-13 * alone:
        return reference

    best, at_reference, at_feasible = np.empty(p.size), np.empty(p.size), np.empty(p.size)
    lowest = np.empty(p.size, dtype=np.int64)
    for rows in blocks:
        s = losses(rows)
        best[rows] = s[:, 0]  # s_i(0) = best_i - V(0) = best_i
        at_reference[rows] = s[np.arange(rows.size), reference[rows]]
        at_feasible[rows] = s[np.arange(rows.size), feasible[rows]]
        lowest[rows] = np.argmin(s, axis=1)
    peak = max(price * capacity, float(np.abs(best).max()))
    moved = at_reference > 1e-12 * peak  # rounding: use a true minimiser instead
    reference = np.where(moved, lowest, reference)
    at_reference[moved] = 0.0
    spare = budget - int(reference.sum())
    bound = _loss_bound(
        feasible, reference, at_feasible, at_reference, loss_at, budget, capacity, price
    )
    bound = max(bound, 0.0) * (1 + 1e-9) + 1e-12 * peak  # rounding must not drop x*'s choices

    def candidates(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """C_i as a mask over n = 0..capacity, and the losses."""
        s = losses(rows)
        keep = s <= bound
        keep[np.arange(rows.size), reference[rows]] = True
        return keep, s

    free, reach = [], 0  # prompts with more than one candidate, the largest move
    for rows in blocks:
        keep, _ = candidates(rows)
        several = keep.sum(axis=1) > 1
        free.append(rows[several])
        moves = np.where(keep[several], np.abs(n - reference[rows[several], None]), 0)
        reach = max(reach, int(moves.max(initial=0)))
    free_rows = np.concatenate(free)
    if free_rows.size == 0:
        return reference  # every prompt has one candidate: the reference is optimal
    drift = max(abs(spare), abs(spare - int(bound / price)))
    movers = 2 * reach + drift
    width = movers * reach
    free_rows = _interchangeable_pruned(free_rows, p, reference, movers)
    keep, s = candidates(free_rows)
    options = [
        (int(row), n[keep[t]] - reference[row], s[t, keep[t]]) for t, row in enumerate(free_rows)
    ]
    return _window_dp(options, reference, width, spare, price)


def _loss_bound(
    feasible: np.ndarray,
    reference: np.ndarray,
    at_feasible: np.ndarray,
    at_reference: np.ndarray,
    loss_at,
    budget: int,
    capacity: int,
    price: float,
) -> float:
    """Step 1 of `_pruned_dp`: U >= L(x*), the least loss of a few feasible points."""
    # Losses are counted relative to the reference (s_i(r_i) = 0), over the prompts
    # that differ from it, so rounding noise of the others does not add up.
    differ = feasible != reference
    bound = float((at_feasible[differ] - at_reference[differ]).sum())
    bound += price * (budget - int(feasible.sum()))
    spare = budget - int(reference.sum())
    if spare >= 0:  # waste the spare units
        bound = min(bound, price * spare)
    if spare >= 1:
        rows = np.flatnonzero((reference >= 2) & (reference < capacity))
        if rows.size:  # one unit on the best single increment
            grown = float(loss_at(rows, reference[rows] + 1).min())
            bound = min(bound, grown + price * (spare - 1))
        takers, givers = np.flatnonzero(reference == 0), np.flatnonzero(reference >= 3)
        if takers.size and givers.size:  # a new pair, paid by the cheapest taken single
            cost = float(loss_at(takers, np.full(takers.size, 2)).min())
            cost += float(loss_at(givers, reference[givers] - 1).min())
            bound = min(bound, cost + price * (spare - 1))
    return bound


def _interchangeable_pruned(
    free_rows: np.ndarray, p: np.ndarray, reference: np.ndarray, movers: int
) -> np.ndarray:
    """The first `movers` rows of each kind (same rate, same reference), lowest index first."""
    # Prompts with the same rate and reference are interchangeable, and an optimum
    # moves at most `movers` prompts: keep that many of each kind (lowest index first).
    _, kind = np.unique(
        np.stack([p[free_rows], reference[free_rows].astype(np.float64)]),
        axis=1,
        return_inverse=True,
    )
    order = np.argsort(kind, kind="stable")
    starts = np.searchsorted(kind[order], kind[order])
    rank = np.empty(free_rows.size, dtype=np.int64)
    rank[order] = np.arange(free_rows.size) - starts
    return free_rows[rank < movers]


def _window_dp(
    options: list[tuple[int, np.ndarray, np.ndarray]],
    reference: np.ndarray,
    width: int,
    spare: int,
    price: float,
) -> np.ndarray:
    """Step 2 of `_pruned_dp`: the DP over the partial sum of moves in [-width, width].

    options: (row, moves from the reference, their losses) per free prompt.
    """
    costs = np.full(2 * width + 1, np.inf)
    costs[width] = 0.0
    picks = np.zeros((len(options), 2 * width + 1), dtype=np.int32)
    for t, (_, moves, loss) in enumerate(options):
        new = np.full(2 * width + 1, np.inf)
        for m, s in zip(moves, loss, strict=True):
            m = int(m)
            src = costs[max(0, -m) : 2 * width + 1 - max(0, m)] + s
            dst = new[max(0, m) : 2 * width + 1 - max(0, -m)]
            better = src < dst
            dst[better] = src[better]
            picks[t, max(0, m) : 2 * width + 1 - max(0, -m)][better] = m
        costs = new
    total = np.arange(-width, width + 1)
    final = np.where(total <= spare, costs + price * (spare - total), np.inf)
    d = int(np.argmin(final)) - width
    allocation = reference.copy()
    for t in range(len(options) - 1, -1, -1):
        row = options[t][0]
        m = int(picks[t, d + width])
        allocation[row] += m
        d -= m
    return allocation


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


def rollouts_for_confidence(success_rates: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    """Rollouts needed to see the minority outcome with probability `confidence`.

    The paper's cost estimate log(1 - alpha) / log(max(p, 1 - p)), for 0 < p < 1.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    return np.log(1.0 - confidence) / np.log(np.maximum(p, 1.0 - p))


def estimated_rollouts(
    success_rates: np.ndarray,
    confidence: float = 0.9,
    cost_estimate: CostEstimate = "confidence",
) -> np.ndarray:
    """The official code's cost estimate per prompt, 0 < p < 1, as a float (not rounded).

    "confidence" (the official "probability"): `rollouts_for_confidence`, +inf where
    max(p, 1 - p) rounds to 1; "expectation": 1 / (p (1 - p)) - 1.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    if cost_estimate == "expectation":
        with np.errstate(divide="ignore", over="ignore"):
            return 1.0 / (p * (1.0 - p)) - 1.0
    if cost_estimate != "confidence":
        raise ValueError(
            f"unknown cost_estimate {cost_estimate!r}: use 'confidence' or 'expectation'"
        )
    with np.errstate(divide="ignore"):
        cost = rollouts_for_confidence(p, confidence)
    return np.where(np.maximum(p, 1.0 - p) == 1.0, np.inf, cost)


def invalidate_short_histories(
    success_rates: np.ndarray,
    num_rewards: np.ndarray,
    min_buffer_length: int = MIN_BUFFER_LENGTH,
) -> np.ndarray:
    """NaN where an estimate rests on fewer than `min_buffer_length` rewards (official validity).

    Args:
        success_rates: float[M], NaN for unseen prompts.
        num_rewards: int[M], rewards behind each estimate (0 for unseen).
    Returns:
        float[M], the rates with invalid ones set to NaN (allocated N_avg).
    """
    p = np.asarray(success_rates, dtype=np.float64)
    counts = np.asarray(num_rewards)
    if counts.shape != p.shape:
        raise ValueError(f"num_rewards shape {counts.shape} != success_rates shape {p.shape}")
    return np.where(counts >= min_buffer_length, p, np.nan)


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


def _fallback_need(
    p: np.ndarray, confidence: float, cost_estimate: CostEstimate, low: int, high: int
) -> int:
    """Rollouts the valued prompts need in all: each one's estimate, rounded up, in [low, high]."""
    if cost_estimate == "confidence":  # -inf, so N_low, where p rounds to 0 or 1
        cost = rollouts_for_confidence(p, confidence)
    else:
        cost = estimated_rollouts(p, confidence, cost_estimate)
    return int(np.clip(np.ceil(cost), low, high).sum())


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
    the optimiser maximises (`knapsack_allocate`); "gradient" needs the exact rules.

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
        allocation[valued] = knapsack_allocate(
            p[valued], knapsack_budget, min_rollouts, max_rollouts, value=value
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
