"""The strategy registry: every name params.yaml accepts is registered, and each
strategy spends the budget it promises."""

from __future__ import annotations

import itertools
from typing import get_args

import numpy as np
import pytest

from pipeline_lib.allocation import allocate_rollouts, knapsack_allocate
from pipeline_lib.allocation.proportional import variance_proportional_allocate
from pipeline_lib.allocation.strategies import STRATEGIES, AllocationRequest, get_strategy, register
from pipeline_lib.config import StrategyName, TrainConfig
from pipeline_lib.status import empty_status, record_visit
from pipeline_lib.training.steps import allocate

CONFIG = TrainConfig(prompts_per_step=6, rollouts_per_prompt=8, max_rollouts=32)
# Unseen, unsolved, solved and mixed prompts: every rule of the policy is exercised.
RATES = np.array([np.nan, 0.0, 1.0, 0.1, 0.5, 0.9])


def request(strategy: str, rates: np.ndarray = RATES, config: TrainConfig = CONFIG):
    chosen = get_strategy(strategy)
    return AllocationRequest(
        success_rates=rates,
        tokens_per_rollout=np.full(rates.size, 4.0),
        budget_rollouts=chosen.budget_rollouts(config),
        config=chosen.configure(config),
    )


def test_the_registry_holds_exactly_the_names_params_accepts():
    assert set(STRATEGIES) == set(get_args(StrategyName))


@pytest.mark.parametrize(
    ("strategy", "budget"),
    [
        ("knapsack", 48),
        ("uniform", 48),
        ("uniform-0.5x", 24),
        ("uniform-2x", 96),
        ("uniform-4x", 192),
        ("dynamic-sampling", 48),  # per round; every round's prompts get N_avg each
        ("knapsack-no-fallback", 48),
        ("knapsack-gradient-only", 48),
        ("knapsack-official", 48),
        ("knapsack-equal-weight", 48),
        ("variance-proportional", 48),
        ("reinforce-ada", 48),  # per round; later rounds sample the unbalanced prompts only
    ],
)
def test_each_strategy_spends_its_budget_multiple_of_prompts_times_n_avg(strategy, budget):
    chosen = get_strategy(strategy)
    assert chosen.budget_rollouts(CONFIG) == budget
    rollouts = chosen.allocate(request(strategy)).rollouts
    assert rollouts.dtype == np.int64 and rollouts.shape == RATES.shape
    assert rollouts.sum() == budget


def test_uniform_arms_split_evenly_and_dynamic_sampling_gives_n_avg_each():
    assert get_strategy("uniform").allocate(request("uniform")).rollouts.tolist() == [8] * 6
    assert get_strategy("uniform-2x").allocate(request("uniform-2x")).rollouts.tolist() == [16] * 6
    chosen = get_strategy("dynamic-sampling")
    assert chosen.refill and not get_strategy("knapsack").refill
    assert chosen.allocate(request("dynamic-sampling")).rollouts.tolist() == [8] * 6


def test_knapsack_is_the_configured_policy_and_ablations_change_one_setting():
    def policy(**changes):
        settings = dict(
            strategy="knapsack",
            rules="exact",
            min_rollouts=2,
            max_rollouts=32,
            unseen_rollouts=8,
            fallback_confidence=0.9,
        )
        return allocate_rollouts(RATES, 48, **(settings | changes)).rollouts.tolist()

    def strategy(name):
        return get_strategy(name).allocate(request(name)).rollouts.tolist()

    assert strategy("knapsack") == policy()
    assert strategy("knapsack-no-fallback") == policy(fallback_confidence=None)
    assert strategy("knapsack-official") == policy(rules="official")
    assert strategy("knapsack-gradient-only") == policy(value="gradient")
    assert strategy("knapsack") != strategy("knapsack-gradient-only")


def test_ablations_fix_their_settings_whatever_params_say():
    official = CONFIG.model_copy(update={"allocation_rules": "official", "budget_unit": "tokens"})
    assert get_strategy("knapsack-no-fallback").configure(official).fallback_confidence is None
    gradient = get_strategy("knapsack-gradient-only").configure(official)
    assert (gradient.rollout_value, gradient.allocation_rules) == ("gradient", "exact")
    assert get_strategy("knapsack-official").configure(CONFIG).buffer_length == 8
    assert get_strategy("knapsack-official").configure(official).budget_unit == "rollouts"
    assert get_strategy("knapsack").configure(official) is official


def test_the_official_ablation_counts_estimates_from_8_rewards_only():
    """Prompts seen with 4 rollouts: an estimate under the exact rules, unseen (N_avg)
    under the official ones."""
    ids = [f"p{i}" for i in range(6)]
    status = record_visit(empty_status(), 0, ids, np.full(6, 4), np.array([0, 1, 2, 3, 4, 1]))
    exact = allocate(status, ids, CONFIG, "knapsack")
    official = allocate(status, ids, CONFIG, "knapsack-official")
    assert not np.isnan(exact.predicted).any() and np.isnan(official.predicted).all()
    assert official.rollouts.tolist() == [8] * 6 and exact.rollouts.tolist() != [8] * 6


def test_knapsack_with_a_token_budget_spends_tokens():
    config = CONFIG.model_copy(update={"budget_unit": "tokens"})
    rates = np.array([0.2, 0.5, 0.7])
    result = get_strategy("knapsack").allocate(request("knapsack", rates, config))
    assert (result.rollouts * 4.0).sum() <= 48 * 4.0  # prompts_per_step x N_avg x mean cost


def gradient_value(n: np.ndarray, p: np.ndarray) -> float:
    """sum_i P(N_i, p_i), P = 1 - p^N - (1-p)^N: the chance of a non-zero gradient."""
    return float(np.sum(1.0 - p**n - (1.0 - p) ** n))


@pytest.mark.parametrize("budget", [6, 9, 14, 20])
def test_gradient_only_value_is_the_brute_force_optimum(budget):
    p = np.array([0.05, 0.3, 0.5, 0.85])
    low, high = 1, 8
    best = max(
        gradient_value(np.array(n), p)
        for n in itertools.product(range(low, high + 1), repeat=p.size)
        if sum(n) == budget
    )
    found = knapsack_allocate(p, budget, low, high, value="gradient")
    assert found.sum() == budget
    assert gradient_value(found, p) == pytest.approx(best, abs=1e-12)


def test_unknown_and_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="unknown allocation strategy 'greedy'.*uniform-2x"):
        get_strategy("greedy")
    with pytest.raises(ValueError, match="registered twice"):
        register("uniform")(lambda r: None)


def test_fractional_budgets_round_to_whole_rollouts_and_keep_one_per_prompt():
    """0.5 x 6 prompts x 8 = 24 rollouts, 4 each; an odd product rounds (0.5 x 5 x 3 = 7.5
    -> 8, Python's round-half-even), and a budget never falls below one per prompt."""
    half = get_strategy("uniform-0.5x")
    assert half.allocate(request("uniform-0.5x")).rollouts.tolist() == [4] * 6
    odd = TrainConfig(prompts_per_step=5, rollouts_per_prompt=3, min_rollouts=1, max_rollouts=8)
    assert half.budget_rollouts(odd) == 8
    thin = TrainConfig(prompts_per_step=5, rollouts_per_prompt=1, min_rollouts=1, max_rollouts=8)
    assert half.budget_rollouts(thin) == 5
    assert get_strategy("uniform-4x").budget_rollouts(CONFIG) == 4 * 48


def test_knapsack_equal_weight_allocates_as_knapsack_and_only_reweights_groups():
    plain, equal = get_strategy("knapsack"), get_strategy("knapsack-equal-weight")
    assert equal.configure(CONFIG).group_weighting == "equal"
    assert plain.configure(CONFIG).group_weighting == "rollouts"
    assert np.array_equal(
        plain.allocate(request("knapsack")).rollouts,
        equal.allocate(request("knapsack-equal-weight")).rollouts,
    )


@pytest.mark.parametrize("budget", [8, 11, 17, 24])
def test_variance_proportional_is_the_brute_force_minimum_of_the_summed_variance(budget):
    p = np.array([0.05, 0.3, 0.5, 0.85])
    low, high = 2, 9
    best = min(
        float(np.sum(p * (1 - p) / np.array(n)))
        for n in itertools.product(range(low, high + 1), repeat=p.size)
        if sum(n) == budget
    )
    found = variance_proportional_allocate(p, budget, low, high)
    assert found.sum() == budget and found.min() >= low and found.max() <= high
    assert float(np.sum(p * (1 - p) / found)) == pytest.approx(best, abs=1e-12)


def test_variance_proportional_follows_sqrt_p_q_and_keeps_knapsacks_floors_and_fallback():
    # Large budget, no cap in the way: rollouts track sqrt(p (1 - p)) (0.3 : 0.5 : 0.3).
    p = np.array([0.1, 0.5, 0.9])
    found = variance_proportional_allocate(p, 1100, 1, 10_000)
    share = np.sqrt(p * (1 - p))
    np.testing.assert_allclose(found / found.sum(), share / share.sum(), atol=2e-3)
    # Through the strategy: unseen N_avg, p = 0 and p = 1 at the floor plus knapsack's
    # fallback (the valued prompts' need is small, the rest goes to p = 0), budget spent.
    rates = np.array([np.nan, 0.0, 1.0, 0.5, 0.5, 0.5])
    rollouts = (
        get_strategy("variance-proportional")
        .allocate(request("variance-proportional", rates))
        .rollouts
    )
    knapsack = get_strategy("knapsack").allocate(request("knapsack", rates)).rollouts
    assert rollouts[0] == 8 and rollouts.sum() == 48
    assert rollouts[1] > CONFIG.min_rollouts  # the fallback explored the unsolved prompt
    assert rollouts[2] == CONFIG.min_rollouts
    assert rollouts[3] == rollouts[4] == rollouts[5]  # equal variance, equal rollouts
    # Where p differs, the two strategies disagree: knapsack values p = 0.1 prompts more
    # than sqrt(p q) does relative to p = 0.5 (V = P(mixed) p q^2 favours low p).
    mixed = np.array([0.1, 0.5, 0.5, 0.5, 0.9, 0.9])
    assert not np.array_equal(
        get_strategy("variance-proportional")
        .allocate(request("variance-proportional", mixed))
        .rollouts,
        get_strategy("knapsack").allocate(request("knapsack", mixed)).rollouts,
    )
    assert knapsack.sum() == 48


def test_variance_proportional_refuses_a_zero_floor():
    with pytest.raises(ValueError, match="min_rollouts"):
        variance_proportional_allocate(np.array([0.5]), 4, 0, 8)


def test_greso_gives_n_avg_to_kept_prompts_and_0_to_skipped_ones():
    status = empty_status()
    ids = ["a", "b", "c", "d", "e", "f"]
    for epoch in range(4):  # a..c always fail, d always solves, e f mixed
        status = record_visit(status, epoch, ids, [8] * 6, [0, 0, 0, 8, 4, 2])
    allocation = allocate(status, ids, CONFIG, "greso", {"p_easy": 0.0, "p_hard": 0.0}, seed=1)
    rollouts = allocation.rollouts
    assert set(rollouts.tolist()) <= {0, 8} and rollouts[4] == rollouts[5] == 8
    assert rollouts.sum() <= get_strategy("greso").budget_rollouts(CONFIG)
    fresh = allocate(empty_status(), ids, CONFIG, "greso", seed=1).rollouts
    assert fresh.tolist() == [8] * 6  # nothing seen, nothing skipped: the full budget
    with pytest.raises(ValueError, match="visit streaks"):
        get_strategy("greso").allocate(request("greso"))
