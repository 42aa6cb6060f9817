"""The exact optimum when min_rollouts = 0, where V is not concave at N = 0.

See the package docstring for the maths; `_optimum_from_zero` is the entry point.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pipeline_lib.allocation.increments import _Increments, _top_increments
from pipeline_lib.allocation.value import rollout_value


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
