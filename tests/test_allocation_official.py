"""`allocate_rollouts(rules="official")` against an oracle written from the official rules.

The oracle below follows the rules as stated in the module docstring of
`pipeline_lib.allocation` (taken from the paper's released code), with a plain
dynamic program for the optimiser; it shares no code with the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.allocation import (
    allocate_rollouts,
    invalidate_short_histories,
    official_extra_rollouts,
)


def true_value(n: int, p: float) -> float:
    if n == 0:
        return 0.0
    return (1.0 - p**n - (1.0 - p) ** n) * p * (1.0 - p) ** 2


def official_item_value(extra: int, p: float, low: int) -> float:
    """The official DP's value of giving an effective prompt `extra` rollouts on top of N_low."""
    return 0.0 if extra == 0 else true_value(low + extra, p)


def dp_exact_spend(rates: list[float], budget: int, low: int, room: int) -> float:
    """Best sum of official values with each extra in [0, room] and exactly `budget` spent."""
    best = np.full(budget + 1, -np.inf)
    best[0] = 0.0
    for p in rates:
        nxt = np.full(budget + 1, -np.inf)
        for k in range(0, min(room, budget) + 1):
            nxt[k:] = np.maximum(nxt[k:], best[: budget + 1 - k] + official_item_value(k, p, low))
        best = nxt
    return float(best[budget])


def split_evenly(alloc: list[int], indices: list[int], amount: int) -> None:
    base, remainder = divmod(amount, len(indices))
    for position, i in enumerate(indices):
        alloc[i] += base + (1 if position < remainder else 0)


def official_oracle(p, budget, low, high, navg, neg, pos, alpha, cost_estimate):
    """(rollouts, fallback moved, optimiser budget, optimum of the official DP) from the rules."""
    m = len(p)
    effective = [i for i in range(m) if not math.isnan(p[i]) and 0 < p[i] < 1]
    alloc = []
    for x in p:
        if math.isnan(x):
            alloc.append(navg)
        elif x == 0:
            alloc.append(neg)
        elif x == 1:
            alloc.append(pos)
        else:
            alloc.append(low)
    left = budget - sum(alloc)
    zeros = [i for i in range(m) if math.isnan(p[i]) or p[i] == 0]
    if not effective:
        if left > 0 and zeros:
            split_evenly(alloc, zeros, left)
        elif left > 0:  # official: every prompt N_avg; here the budget split evenly
            alloc = [0] * m
            split_evenly(alloc, list(range(m)), budget)
        return alloc, left, 0, 0.0
    dp_budget, moved = left, 0
    receivers = zeros or [i for i in range(m) if i not in effective]
    if alpha is not None and receivers:
        need = 0
        for i in effective:
            x = p[i]
            if cost_estimate == "confidence":
                biggest = max(x, 1 - x)
                cost = math.inf if biggest == 1 else math.log(1 - alpha) / math.log(biggest)
            else:
                cost = 1 / (x * (1 - x)) - 1
            need += math.floor(min(high, cost))
        if need < left:
            moved, dp_budget = left - need, need
            split_evenly(alloc, receivers, moved)
    room = high - low
    placed = max(0, min(dp_budget, len(effective) * room))
    optimum = dp_exact_spend([p[i] for i in effective], placed, low, room)
    # Effective prompts' counts are left at their floors: the caller checks them by value.
    return alloc, moved, dp_budget, optimum


def check_against_oracle(p, budget, low, high, navg, neg, pos, alpha, cost_estimate):
    result = allocate_rollouts(
        np.array(p, dtype=float),
        budget,
        rules="official",
        min_rollouts=low,
        max_rollouts=high,
        unseen_rollouts=navg,
        negative_rollouts=neg,
        positive_rollouts=pos,
        fallback_confidence=alpha,
        cost_estimate=cost_estimate,
    )
    expected, moved, dp_budget, optimum = official_oracle(
        p, budget, low, high, navg, neg, pos, alpha, cost_estimate
    )
    n = result.rollouts
    assert n.dtype == np.int64 and n.shape == (len(p),)
    assert n.sum() == budget
    effective = [i for i in range(len(p)) if not math.isnan(p[i]) and 0 < p[i] < 1]
    others = [i for i in range(len(p)) if i not in effective]
    assert [int(n[i]) for i in others] == [expected[i] for i in others]
    offered = dp_budget + low * len(effective) if effective else 0  # floors included
    assert (result.fallback_rollouts, result.knapsack_budget) == (moved, offered)
    assert sum(int(n[i]) for i in effective) == offered
    extras = [int(n[i]) - low for i in effective]
    assert min(extras, default=0) >= 0
    room = high - low
    if dp_budget > len(effective) * room:  # the unplaceable part is spread evenly, uncapped
        spread = [0] * len(effective)
        split_evenly(spread, list(range(len(effective))), dp_budget - len(effective) * room)
        assert extras == [room + s for s in spread]
    else:
        assert max(extras, default=0) <= room
        pairs = zip(extras, effective, strict=True)
        value = sum(official_item_value(k, p[i], low) for k, i in pairs)
        assert value == pytest.approx(optimum, rel=1e-12, abs=1e-15)
    return n


rates = st.one_of(
    st.just(math.nan),
    st.sampled_from([0.0, 1.0]),
    st.integers(1, 7).map(lambda k: k / 8),
    st.floats(0.0, 1.0, allow_nan=False),
)


@st.composite
def instances(draw):
    m = draw(st.integers(1, 7))
    p = draw(st.lists(rates, min_size=m, max_size=m))
    low = draw(st.integers(0, 3))
    high = draw(st.integers(low, low + 6))
    navg = draw(st.integers(0, 10))
    neg = draw(st.one_of(st.none(), st.integers(0, 4)))
    pos = draw(st.one_of(st.none(), st.integers(0, 4)))
    alpha = draw(st.sampled_from([None, 0.3, 0.5, 0.9, 0.99]))
    cost_estimate = draw(st.sampled_from(["confidence", "expectation"]))
    floors = sum(
        navg
        if math.isnan(x)
        else (low if neg is None else neg)
        if x == 0
        else (low if pos is None else pos)
        if x == 1
        else low
        for x in p
    )
    budget = floors + draw(st.integers(0, 40))
    return p, budget, low, high, navg, neg, pos, alpha, cost_estimate


@settings(max_examples=400, deadline=None)
@given(instances())
def test_official_rules_match_the_oracle(instance):
    p, budget, low, high, navg, neg, pos, alpha, cost_estimate = instance
    neg_floor = low if neg is None else neg
    pos_floor = low if pos is None else pos
    check_against_oracle(p, budget, low, high, navg, neg_floor, pos_floor, alpha, cost_estimate)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("low", [0, 2])
def test_official_rules_match_the_oracle_at_the_embedded_default_scale(seed, low):
    """64 prompts, budget 512, rates k/8 with mass at 0 and 1, some unseen."""
    rng = np.random.default_rng(seed)
    p = rng.binomial(8, rng.uniform(0, 1, 64)) / 8
    p[rng.uniform(size=64) < 0.1] = np.nan
    for alpha in (None, 0.9):
        check_against_oracle(list(p), 512, low, 128, 8, low, low, alpha, "confidence")


def test_fallback_floors_the_cost_and_ignores_n_low():
    # cost(0.5) = log(0.1) / log(0.5) = 3.32 -> 3 each; budget left after floors 70.
    n = check_against_oracle([0.5, 0.5, 0.0, 0.0, 1.0], 80, 2, 64, 8, 2, 2, 0.9, "confidence")
    assert n.tolist() == [5, 5, 34, 34, 2]  # exact rules give the p = 0.5 prompts 4 each
    exact = allocate_rollouts(np.array([0.5, 0.5, 0.0, 0.0, 1.0]), 80, max_rollouts=64)
    assert exact.rollouts[:2].tolist() == [4, 4]


def test_unseen_prompts_count_as_zero_and_the_remainder_goes_first_in_index_order():
    p = [0.5, np.nan, 1.0, 0.0, np.nan]
    # floors 2 + 8 + 2 + 2 + 8 = 22, left 19, need 3, surplus 16 over indices 1, 3, 4.
    n = check_against_oracle(p, 41, 2, 64, 8, 2, 2, 0.9, "confidence")
    assert n.tolist() == [5, 14, 2, 7, 13]


def test_surplus_is_not_capped_at_n_up():
    n = check_against_oracle([0.5, 0.0], 200, 2, 16, 8, 2, 2, 0.9, "confidence")
    assert n.tolist() == [5, 195]


def test_without_zero_prompts_the_surplus_goes_to_every_non_effective_prompt():
    n = check_against_oracle([1.0, 0.5, 1.0], 30, 2, 64, 8, 2, 2, 0.9, "confidence")
    assert n.tolist() == [13, 5, 12]


def test_with_every_prompt_effective_the_fallback_has_nowhere_to_go():
    # The official code divides by zero here; the optimiser keeps the whole budget.
    result = allocate_rollouts(np.array([0.5, 0.5]), 40, rules="official")
    assert result.knapsack_budget == 40 and result.fallback_rollouts == 0
    assert result.rollouts.tolist() == [20, 20]


@pytest.mark.parametrize(
    "p, budget, expected",
    [
        ([0.0, np.nan, 1.0], 30, [11, 17, 2]),  # left 18 evenly over p = 0 and unseen
        ([0.0, np.nan, 1.0, 0.0], 31, [8, 14, 2, 7]),  # left 17 = 6 + 6 + 5 in index order
        ([1.0, 1.0, 1.0], 24, [8, 8, 8]),  # no zero prompt: N_avg each
        ([1.0, 1.0, 1.0], 6, [2, 2, 2]),  # nothing left: floors
    ],
)
def test_without_effective_prompts(p, budget, expected):
    n = check_against_oracle(p, budget, 2, 64, 8, 2, 2, 0.9, "confidence")
    assert n.tolist() == expected


def test_budget_the_optimiser_cannot_place_is_spread_evenly_over_effective_prompts():
    # N_up - N_low = 1: the DP places one extra each, the other 13 go 7 + 6, uncapped.
    n = check_against_oracle([0.5, 0.3, 1.0], 21, 2, 3, 8, 2, 2, None, "confidence")
    assert n.tolist() == [10, 9, 2]


def test_expectation_cost():
    # 1 / (0.25) - 1 = 3 exactly, floor 3 (p = 0.5); 64 / 7 - 1 = 8.14 -> 8 (p = 1/8).
    n = check_against_oracle([0.5, 0.125, 0.0], 40, 2, 64, 8, 2, 2, 0.9, "expectation")
    assert n[2] == 2 + (40 - 6 - 11)


def test_first_extra_rollout_is_worth_v_of_n_low_plus_one():
    # The official DP values k = 0 at 0, so a prompt's first extra rollout is worth
    # V(N_low + 1) rather than dV(N_low): it spreads where the true objective
    # concentrates on the most valuable prompt.
    p = np.array([0.5, 0.1, 0.1])
    official = allocate_rollouts(p, 9, rules="official", fallback_confidence=None).rollouts
    exact = allocate_rollouts(p, 9, fallback_confidence=None).rollouts
    assert official.tolist() == [3, 3, 3] and exact.tolist() == [5, 2, 2]

    def official_objective(n):
        return sum(official_item_value(int(k) - 2, x, 2) for k, x in zip(n, p, strict=True))

    def true_objective(n):
        return sum(true_value(int(k), x) for k, x in zip(n, p, strict=True))

    assert official_objective(official) > official_objective(exact)
    assert true_objective(exact) > true_objective(official)


def test_negative_budget_left_is_rejected_naming_the_floors():
    with pytest.raises(ValueError, match="cannot cover the floors"):
        allocate_rollouts(np.array([np.nan, 0.5]), 9, rules="official")


def test_unknown_rules_and_cost_estimate_are_named():
    with pytest.raises(ValueError, match="'paper'"):
        allocate_rollouts(np.array([0.5]), 8, rules="paper")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'variance'"):
        allocate_rollouts(np.array([0.5]), 8, cost_estimate="variance")  # type: ignore[arg-type]


def test_official_extra_rollouts_takes_effective_prompts_only():
    with pytest.raises(ValueError, match="effective"):
        official_extra_rollouts(np.array([0.5, 1.0]), 4, 2, 8)


def test_invalidate_short_histories_marks_fewer_than_min_buffer_length_rewards():
    p = np.array([0.5, 0.25, np.nan, 1.0])
    out = invalidate_short_histories(p, np.array([8, 7, 0, 16]))
    np.testing.assert_array_equal(out, [0.5, np.nan, np.nan, 1.0])
    assert np.isnan(invalidate_short_histories(p, np.array([8, 8, 8, 3]), 4)[2])
