"""Knapsack-RL allocation: exact optimality against a brute-force DP, and the paper's policy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.allocation import (
    allocate_rollouts,
    allocate_rollouts_by_tokens,
    knapsack_allocate,
    knapsack_allocate_tokens,
    marginal_gain,
    rollout_value,
    rollouts_for_confidence,
    uniform_allocate,
)


def true_value(n: int, p: float) -> float:
    """V(N, p) from the definition: no rollouts, or one, cannot hold both outcomes."""
    if n == 0:
        return 0.0
    return (1.0 - p**n - (1.0 - p) ** n) * p * (1.0 - p) ** 2


def value_of(n: np.ndarray, p: np.ndarray) -> float:
    return sum(true_value(int(a), float(b)) for a, b in zip(n, p, strict=True))


def dp_optimum(p: np.ndarray, budget: int, low: int, high: int, cost=None) -> float:
    """Best sum_i V(N_i, p_i) with low <= N_i <= high and sum cost_i * N_i <= budget (oracle)."""
    cost = np.ones(p.size, dtype=np.int64) if cost is None else cost
    best = np.full(budget + 1, -np.inf)
    best[0] = 0.0
    for p_i, c_i in zip(p, cost, strict=True):
        nxt = np.full(budget + 1, -np.inf)
        for n in range(low, high + 1):
            w = int(n * c_i)
            if w > budget:
                break
            v = true_value(n, float(p_i))
            nxt[w:] = np.maximum(nxt[w:], best[: budget + 1 - w] + v)
        best = nxt
    return float(best.max())


rates = st.one_of(
    st.sampled_from([0.0, 1.0, 0.5, 0.25, 0.9, 0.01]),
    st.floats(0.0, 1.0, allow_nan=False),
)


@st.composite
def problems(draw):
    num_prompts = draw(st.integers(1, 6))
    p = np.array(draw(st.lists(rates, min_size=num_prompts, max_size=num_prompts)))
    low = draw(st.integers(0, 3))
    high = draw(st.integers(low, low + 7))
    budget = draw(st.integers(num_prompts * low, num_prompts * high + 4))
    return p, budget, low, high


@settings(max_examples=300, deadline=None)
@given(problems())
def test_knapsack_matches_dp_optimum_and_constraints(problem):
    p, budget, low, high = problem
    n = knapsack_allocate(p, budget, low, high)
    assert n.dtype == np.int64
    assert np.all(n >= low) and np.all(n <= high)
    assert n.sum() == min(budget, p.size * high)
    value = value_of(n, p)
    assert value == pytest.approx(dp_optimum(p, budget, low, high), rel=1e-12, abs=1e-15)


@settings(max_examples=100, deadline=None)
@given(problems())
def test_knapsack_is_deterministic_and_order_equivariant_in_value(problem):
    p, budget, low, high = problem
    first = knapsack_allocate(p, budget, low, high)
    assert np.array_equal(first, knapsack_allocate(p.copy(), budget, low, high))
    perm = np.random.default_rng(0).permutation(p.size)
    shuffled = knapsack_allocate(p[perm], budget, low, high)
    assert value_of(shuffled, p[perm]) == pytest.approx(value_of(first, p), rel=1e-12, abs=1e-15)


def test_rollout_value_is_the_definition_including_zero_rollouts():
    n = np.arange(0, 50)
    for p in [0.0, 0.003, 0.1, 0.5, 0.77, 0.999, 1.0]:
        expected = [true_value(int(k), p) for k in n]
        np.testing.assert_allclose(rollout_value(n, np.full(n.size, p)), expected, atol=1e-16)
    assert rollout_value(np.array(0), np.array(0.5)) == 0.0  # not -p (1-p)^2


def test_marginal_gain_is_the_difference_of_values_and_never_grows_from_one():
    n = np.arange(0, 200)
    for p in [0.003, 0.1, 0.5, 0.77, 0.999]:
        gains = marginal_gain(n, np.full(n.size, p))
        diffs = rollout_value(n + 1, np.full(n.size, p)) - rollout_value(n, np.full(n.size, p))
        np.testing.assert_allclose(gains, diffs, atol=1e-15)
        assert gains[0] == 0.0  # V(0) = V(1) = 0: the first rollout alone is worth nothing
        assert np.all(np.diff(gains[1:]) <= 1e-18)


def test_min_rollouts_zero_takes_rollouts_in_pairs_regression():
    # The closed form valued V(0) at -p(1-p)^2, so [1, 1, 1, 1] (worth 0) looked optimal.
    n = knapsack_allocate(np.array([0.5] * 4), 4, 0, 8)
    assert n.tolist() == [2, 2, 0, 0]
    assert value_of(n, np.array([0.5] * 4)) == pytest.approx(2 * true_value(2, 0.5))


@pytest.mark.parametrize(
    "p, budget, high, expected",
    [
        # An odd unit no prompt can use well: the pruned DP decides between
        # completing a pair elsewhere and wasting it.
        ([0.875, 0.875, 0.25, 0.0], 3, 2, [1, 0, 2, 0]),
        ([0.125, 0.5, 0.375, 0.0], 4, 3, [0, 2, 2, 0]),
        ([0.5] * 3, 1, 3, [1, 0, 0]),  # one unit: nothing is worth anything
        ([0.5] * 3, 5, 3, [3, 2, 0]),
        # The odd unit sits at a rate of 2e-50, worth ~1e-100: far below float resolution.
        ([0.5, 2.11690407e-50], 21, 20, [20, 1]),
    ],
)
def test_min_rollouts_zero_examples(p, budget, high, expected):
    p = np.array(p)
    n = knapsack_allocate(p, budget, 0, high)
    assert value_of(n, p) == pytest.approx(dp_optimum(p, budget, 0, high), rel=1e-12, abs=1e-15)
    assert value_of(np.array(expected), p) == pytest.approx(value_of(n, p), rel=1e-12, abs=1e-15)
    assert n.sum() == min(budget, p.size * high)


def test_edge_cases_named_in_the_contract():
    p = np.array([0.0, 1.0, 0.5, 0.5])
    assert knapsack_allocate(p, 4 * 5, 5, 5).tolist() == [5, 5, 5, 5]  # min == max
    assert knapsack_allocate(p, 1000, 2, 7).tolist() == [7, 7, 7, 7]  # budget > M * max
    n = knapsack_allocate(p, 10, 2, 7)  # p in {0, 1} get nothing beyond the floor
    assert n.tolist() == [2, 2, 3, 3]  # repeated p share evenly
    with pytest.raises(ValueError, match="below 4 prompts x min_rollouts 2 = 8"):
        knapsack_allocate(p, 7, 2, 7)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([0.5, np.nan]), "finite"),
        (np.array([0.5, 1.5]), r"\[0, 1\]"),
        (np.array([[0.5]]), "1-D"),
    ],
)
def test_invalid_success_rates_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        knapsack_allocate(bad, 10, 1, 5)


def test_hard_prompt_gets_many_rollouts_at_paper_scale():
    # A hard prompt (p = 0.1, high InfoGain) among easy ones gets far more than N_avg.
    p = np.array([0.1] + [0.9] * 255)
    n = knapsack_allocate(p, 256 * 8, 2, 128)
    assert n[0] > 8 and n.sum() == 2048


def test_large_problem_runs_and_respects_constraints():
    p = np.random.default_rng(0).uniform(0, 1, 100_000)
    n = knapsack_allocate(p, 8 * p.size, 2, 256)
    assert n.sum() == 8 * p.size and n.min() >= 2 and n.max() <= 256


@pytest.mark.parametrize("copies", [20, 300])
def test_min_rollouts_zero_with_many_interchangeable_prompts_and_an_odd_unit(copies):
    # Every p = 0.5 prompt fills its first three rollouts before any p = 0.25 one
    # starts; the odd unit then needs the DP, which keeps a few prompts of each kind.
    p = np.r_[np.full(copies, 0.5), np.full(copies, 0.25)]
    n = knapsack_allocate(p, 3 * copies + 1, 0, 8)
    assert n.sum() == 3 * copies + 1
    best = dp_optimum(p, 3 * copies + 1, 0, 8)
    assert value_of(n, p) == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_large_problem_from_zero_rollouts_beats_the_floor_of_two():
    # Repeated rates and an odd budget: many ties at the threshold.
    p = np.random.default_rng(1).integers(0, 9, 20_000) / 8
    n = knapsack_allocate(p, 8 * p.size + 1, 0, 64)
    assert n.sum() == 8 * p.size + 1 and n.min() >= 0 and n.max() <= 64
    floored = knapsack_allocate(p, 8 * p.size + 1, 2, 64)  # a feasible point of the same problem
    assert rollout_value(n, p).sum() >= rollout_value(floored, p).sum() - 1e-12


@settings(max_examples=150, deadline=None)
@given(problems(), st.lists(st.integers(1, 4), min_size=6, max_size=6))
def test_token_knapsack_within_one_increment_of_optimum(problem, costs):
    p, _, low, high = problem
    low, high = max(low, 1), max(high, 1)
    cost = np.array(costs[: p.size], dtype=np.int64)
    floor = int((cost * low).sum())
    budget = floor + int(cost.sum()) * 2
    n = knapsack_allocate_tokens(p, cost.astype(float), budget, low, high)
    assert np.all(n >= low) and np.all(n <= high)
    assert float((n * cost).sum()) <= budget
    best = dp_optimum(p, budget, low, high, cost)
    bound = float(marginal_gain(np.full(p.size, low), p).max())
    assert value_of(n, p) >= best - bound - 1e-12


def test_token_knapsack_rejects_zero_min_rollouts():
    with pytest.raises(ValueError, match="min_rollouts >= 1"):
        knapsack_allocate_tokens(np.array([0.5]), np.array([1.0]), 10, 0, 4)


def test_token_knapsack_prefers_cheap_prompts_at_equal_value():
    n = knapsack_allocate_tokens(np.array([0.3, 0.3]), np.array([10.0, 100.0]), 400, 1, 20)
    assert n[0] > n[1]


def test_rollouts_for_confidence_matches_the_formula():
    assert rollouts_for_confidence(np.array([0.5]), 0.9)[0] == pytest.approx(
        np.log(0.1) / np.log(0.5)
    )


def test_policy_floors_unseen_and_exact_budget():
    p = np.array([np.nan, 0.0, 1.0, 0.5, 0.2, np.nan])
    result = allocate_rollouts(p, 6 * 8, min_rollouts=2, max_rollouts=32, unseen_rollouts=8)
    n = result.rollouts
    assert n[0] == 8 and n[5] == 8
    assert n[2] == 2  # solved prompt keeps the floor while p = 0 exists
    assert n.sum() == 48


def test_policy_fallback_sends_surplus_to_unsolved_prompts():
    # Easy-ish valued prompts need few rollouts to see both outcomes at 90 %.
    p = np.array([0.5, 0.5, 0.0, 0.0, 1.0])
    result = allocate_rollouts(p, 5 * 16, min_rollouts=2, max_rollouts=64)
    need = int(np.ceil(np.log(0.1) / np.log(0.5)))  # 4 per p = 0.5 prompt
    assert result.knapsack_budget == 2 * need
    assert result.rollouts[:2].tolist() == [need, need]
    assert result.rollouts[4] == 2
    assert result.rollouts[2] + result.rollouts[3] == 80 - 2 * need - 2
    assert result.fallback_rollouts == result.rollouts[2] + result.rollouts[3] - 4
    assert result.rollouts.sum() == 80


def test_policy_without_fallback_spends_everything_on_valued_prompts():
    p = np.array([0.5, 0.3, 0.0])
    result = allocate_rollouts(p, 30, min_rollouts=2, max_rollouts=64, fallback_confidence=None)
    assert result.rollouts[2] == 2 and result.rollouts.sum() == 30
    assert result.fallback_rollouts == 0


def test_policy_rejects_budget_below_floors_naming_them():
    with pytest.raises(ValueError, match="cannot cover the floors"):
        allocate_rollouts(np.array([np.nan, np.nan]), 10, unseen_rollouts=8)


def test_uniform_baseline_spends_exact_budget_evenly():
    n = allocate_rollouts(np.array([0.1, np.nan, 0.0]), 10, strategy="uniform").rollouts
    assert n.tolist() == [4, 3, 3]
    assert uniform_allocate(4, 32).tolist() == [8] * 4


def test_unknown_strategy_is_named_in_the_error():
    with pytest.raises(ValueError, match="'greedy'"):
        allocate_rollouts(np.array([0.5]), 8, strategy="greedy")  # type: ignore[arg-type]


@st.composite
def wide_problems(draw):
    """Few prompts, wide rollout ranges: exercises the truncated-then-full ranking."""
    num_prompts = draw(st.integers(1, 4))
    p = np.array(draw(st.lists(rates, min_size=num_prompts, max_size=num_prompts)))
    low = draw(st.integers(0, 2))
    high = draw(st.integers(low + 20, low + 60))
    budget = draw(st.integers(num_prompts * low, num_prompts * high))
    return p, budget, low, high


@settings(max_examples=60, deadline=None)
@given(wide_problems())
def test_knapsack_matches_dp_with_wide_rollout_ranges(problem):
    p, budget, low, high = problem
    n = knapsack_allocate(p, budget, low, high)
    assert n.sum() == min(budget, p.size * high) and n.min() >= low and n.max() <= high
    value = value_of(n, p)
    assert value == pytest.approx(dp_optimum(p, budget, low, high), rel=1e-12, abs=1e-15)


eighths = st.integers(0, 8).map(lambda k: k / 8)


@st.composite
def from_zero_problems(draw):
    """min_rollouts 0 or 1, rates k/8 (repeats make the ties that leave singletons)."""
    num_prompts = draw(st.integers(1, 8))
    p = np.array(draw(st.lists(eighths | rates, min_size=num_prompts, max_size=num_prompts)))
    low = draw(st.integers(0, 1))
    high = draw(st.integers(max(low, 1), 12))
    budget = draw(st.integers(num_prompts * low, num_prompts * high + 3))
    return p, budget, low, high


@settings(max_examples=300, deadline=None)
@given(from_zero_problems())
def test_knapsack_from_zero_or_one_rollout_matches_dp(problem):
    p, budget, low, high = problem
    n = knapsack_allocate(p, budget, low, high)
    assert n.sum() == min(budget, p.size * high) and n.min() >= low and n.max() <= high
    value = value_of(n, p)
    assert value == pytest.approx(dp_optimum(p, budget, low, high), rel=1e-12, abs=1e-15)


def test_token_budget_policy_floors_and_budget():
    """Unseen prompts get N_avg, p = 0 / 1 the floor, valued prompts share what is left
    and the whole allocation stays within the token budget."""
    p = np.array([np.nan, 0.0, 1.0, 0.5, 0.5])
    cost = np.array([4.0, 2.0, 2.0, 1.0, 3.0])
    budget = 5 * 8 * float(cost.mean())
    result = allocate_rollouts_by_tokens(
        p, cost, budget, min_rollouts=2, max_rollouts=64, unseen_rollouts=8
    )
    n = result.rollouts
    assert n[:3].tolist() == [8, 2, 2]
    assert float((n * cost).sum()) <= budget
    assert n[3] > n[4] >= 2  # equal value, the short answers are cheaper
    assert result.knapsack_budget == int(n[3:].sum())


def test_token_budget_policy_rejects_mismatched_costs():
    with pytest.raises(ValueError, match="tokens_per_rollout shape"):
        allocate_rollouts_by_tokens(np.array([0.5, 0.5]), np.array([1.0]), 10.0)
