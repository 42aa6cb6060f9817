"""Rollout-allocation strategies: how one training step spends its rollouts.

A strategy is one function of one `AllocationRequest` (the step's success-rate
estimates, expected tokens per rollout, its budget and the settings) returning
an `AllocationResult` (rollouts per prompt), registered under its name with
what the training loop needs to know:

- `budget_multiplier`: the step's budget is multiplier x prompts_per_step x N_avg
  rollouts, rounded to a whole rollout (`uniform-2x` spends twice what the others
  spend, `uniform-0.5x` half: the uniform dose-response that every other arm's
  compute is measured in);
- `refill`: the step samples in rounds (DAPO's dynamic sampling, see
  `training.steps.sample_step`): each round draws prompts_per_step new prompts,
  allocates them with the function, and the step stops once prompts_per_step
  groups with mixed rewards are found or after `max_sampling_rounds` rounds.
  Every round's rollouts count as spent compute; only the kept groups go into
  the update;
- `balanced_rounds`: the step resamples each prompt until its rollouts hold a balanced
  group or the rounds run out, and trains on that group (Reinforce-Ada,
  `training.steps.sample_step`);
- `skips`, `initial_state`, `adapt`: a strategy that skips prompts before rollout
  (GRESO) gives them 0 rollouts, and carries a state from step to step (its
  exploration probabilities), moved by `adapt` after each step;
- `settings`: train settings the strategy fixes, whatever params.yaml says. The
  ablations are the knapsack function with one setting changed (the official
  rules bring their own validity rule, min_buffer_length 8, with them).

Adding a strategy is one decorated function here, its name in
`config.StrategyName` (so params.yaml rejects unknown names before any compute)
and a test of its budget arithmetic in tests/test_strategies.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline_lib.allocation import (
    AllocationResult,
    allocate_rollouts,
    allocate_rollouts_by_tokens,
    greso,
    reinforce_ada,
    uniform_allocate,
)
from pipeline_lib.config import TrainConfig


@dataclass(frozen=True)
class AllocationRequest:
    """What a strategy sees of one step (or one sampling round)."""

    success_rates: np.ndarray
    """float[M] estimated success rate per prompt; NaN where unseen or not yet valid."""
    tokens_per_rollout: np.ndarray
    """float[M] expected completion tokens of one rollout (max_new_tokens if unseen)."""
    budget_rollouts: int
    """Rollouts to spend: budget_multiplier x prompts_per_step x N_avg."""
    config: TrainConfig
    """The train settings, with the strategy's own `settings` applied."""
    solved_streaks: np.ndarray | None = None
    """int[M] latest consecutive visits with every rollout correct (0 if unseen)."""
    unsolved_streaks: np.ndarray | None = None
    """int[M] latest consecutive visits with every rollout wrong (0 if unseen)."""
    state: Mapping[str, float] = field(default_factory=dict)
    """A stateful strategy's state after the previous step (`Strategy.adapt`)."""
    rng: np.random.Generator | None = None
    """Seeded by (run seed, step, round): for strategies that draw (GRESO's skips)."""


AllocateFn = Callable[[AllocationRequest], AllocationResult]
# (state, epoch, share of the step's rolled-out groups all correct, all wrong) -> state
AdaptFn = Callable[[Mapping[str, float], int, float, float], dict[str, float]]


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its allocation function and how the loop runs it."""

    name: str
    allocate: AllocateFn
    budget_multiplier: float = 1.0
    refill: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)
    skips: bool = False
    """Prompts it gives 0 rollouts leave the round before rollout (GRESO's skipping)."""
    balanced_rounds: int = 0
    """> 0: each prompt is resampled (its allocation per round) for up to this many rounds
    until it holds a balanced group, which is what it trains on (Reinforce-Ada)."""
    initial_state: Mapping[str, float] = field(default_factory=dict)
    adapt: AdaptFn | None = None
    """How the state moves after each step (kept in the run's metric history as
    `strategy/<key>`, so a resumed run continues it)."""

    def budget_rollouts(self, config: TrainConfig) -> int:
        """The step's (or each round's) rollout budget, at least one rollout per prompt."""
        rollouts = config.prompts_per_step * config.rollouts_per_prompt
        budget = round(self.budget_multiplier * rollouts)
        return max(budget, config.prompts_per_step)

    def configure(self, config: TrainConfig) -> TrainConfig:
        """`config` with the settings this strategy fixes (validated like params.yaml)."""
        if not self.settings:
            return config
        return TrainConfig.model_validate(config.model_dump() | dict(self.settings))


STRATEGIES: dict[str, Strategy] = {}


def register(
    name: str,
    *,
    budget_multiplier: float = 1.0,
    refill: bool = False,
    settings: Mapping[str, Any] | None = None,
    skips: bool = False,
    balanced_rounds: int = 0,
    initial_state: Mapping[str, float] | None = None,
    adapt: AdaptFn | None = None,
) -> Callable[[AllocateFn], AllocateFn]:
    """Decorator: register `function` as strategy `name` (stackable: one function, many names)."""

    def add(function: AllocateFn) -> AllocateFn:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = Strategy(
            name,
            function,
            budget_multiplier,
            refill,
            dict(settings or {}),
            skips,
            balanced_rounds,
            dict(initial_state or {}),
            adapt,
        )
        return function

    return add


def get_strategy(name: str) -> Strategy:
    """The strategy registered as `name`; ValueError naming the known ones otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown allocation strategy {name!r}; known: {', '.join(STRATEGIES)}"
        ) from None


# Ablations: knapsack with one setting changed, always counting rollouts (the token
# budget has its own rules and no fallback).
@register(
    "knapsack-official",
    settings={
        "allocation_rules": "official",
        "rollout_value": "info_gain",
        "budget_unit": "rollouts",
    },
)
@register(
    "knapsack-gradient-only",
    settings={"rollout_value": "gradient", "allocation_rules": "exact", "budget_unit": "rollouts"},
)
@register("knapsack-no-fallback", settings={"fallback_confidence": None, "budget_unit": "rollouts"})
# Same information, groups weighted equally in the loss: separates knapsack's information
# from the reweighting that its uneven group sizes bring under token-mean.
@register("knapsack-equal-weight", settings={"group_weighting": "equal"})
@register("knapsack")
def knapsack(request: AllocationRequest) -> AllocationResult:
    """Knapsack RL at B = prompts_per_step x N_avg: `allocate_rollouts` with the settings'
    rules, value and fallback; `budget_unit: tokens` spends as many expected completion
    tokens instead (exact rules, no fallback).
    """
    config = request.config
    if config.budget_unit == "tokens":
        costs = request.tokens_per_rollout
        return allocate_rollouts_by_tokens(
            request.success_rates,
            costs,
            request.budget_rollouts * float(costs.mean()),
            min_rollouts=config.min_rollouts,
            max_rollouts=config.max_rollouts,
            unseen_rollouts=config.rollouts_per_prompt,
        )
    return _policy(request, config.allocation_rules, config.rollout_value)


def _policy(request: AllocationRequest, rules: str, value: str) -> AllocationResult:
    """`allocate_rollouts` (knapsack's floors, cap and fallback) with these rules and value."""
    config = request.config
    return allocate_rollouts(
        request.success_rates,
        request.budget_rollouts,
        strategy="knapsack",
        rules=rules,
        min_rollouts=config.min_rollouts,
        max_rollouts=config.max_rollouts,
        unseen_rollouts=config.rollouts_per_prompt,
        negative_rollouts=config.unsolved_rollouts,
        positive_rollouts=config.solved_rollouts,
        fallback_confidence=config.fallback_confidence,
        cost_estimate=config.fallback_cost,
        value=value,
    )


@register("variance-proportional", settings={"allocation_rules": "exact"})
def variance_proportional(request: AllocationRequest) -> AllocationResult:
    """Rollouts in proportion to sqrt(p (1 - p)) of the estimate, with knapsack's floors,
    cap and fallback: `allocate_rollouts` with the optimiser replaced by
    `allocation.proportional.variance_proportional_allocate` (the integer optimum of the
    summed variance sum_i p_i (1 - p_i) / N_i, the objective of VIP, arXiv 2602.01601,
    whose repository holds no code). Deviation: VIP estimates p with a Gaussian process
    over prompt embeddings and solves a convex program; here p is the status estimate
    every strategy sees, and the integer optimum is exact. Exact rules always (the
    official rules know only V); the token budget is not offered.
    """
    return _policy(request, "exact", "variance")


@register("uniform-4x", budget_multiplier=4)
@register("uniform-2x", budget_multiplier=2)
@register("uniform-0.5x", budget_multiplier=0.5)
@register("uniform")
def uniform(request: AllocationRequest) -> AllocationResult:
    """The budget split evenly: N_avg each (uniform), multiplier x N_avg each (the
    dose-response arms uniform-0.5x, uniform-2x, uniform-4x)."""
    return AllocationResult(
        uniform_allocate(request.success_rates.size, request.budget_rollouts), 0, 0
    )


@register("dynamic-sampling", refill=True)
def dynamic_sampling(request: AllocationRequest) -> AllocationResult:
    """DAPO's dynamic sampling: each round's prompts get N_avg rollouts each.

    The rounds (refill until prompts_per_step groups hold both outcomes) are the
    loop's part, `training.steps.sample_step`.
    """
    size = request.success_rates.size
    return AllocationResult(np.full(size, request.config.rollouts_per_prompt, np.int64), 0, 0)


@register(
    "greso", refill=True, skips=True, initial_state=greso.INITIAL_KEEP, adapt=greso.adapt_keep
)
def greso_skip(request: AllocationRequest) -> AllocationResult:
    """GRESO (Infini-AI-Lab/GRESO, `verl/trainer/ttis/presampling_selector.py`, see
    `allocation/greso.py` for the lines and the deviations): before rollout, skip each
    prompt whose latest visits were all solved or all unsolved with GRESO's adaptive
    probability (0 rollouts: it costs nothing); the others get N_avg each. The rounds
    that fill the step with further prompts are DAPO's dynamic sampling (`refill`),
    which GRESO's code builds on.
    """
    size = request.success_rates.size
    if request.solved_streaks is None or request.unsolved_streaks is None or request.rng is None:
        raise ValueError("greso needs the prompts' visit streaks and a seeded generator")
    keep = greso.keep_probabilities(request.solved_streaks, request.unsolved_streaks, request.state)
    rollouts = np.full(size, request.config.rollouts_per_prompt, np.int64)
    rollouts[greso.skip_mask(keep, request.rng)] = 0
    return AllocationResult(rollouts, 0, 0)


@register(
    "reinforce-ada",
    balanced_rounds=reinforce_ada.MAX_ROUNDS,
    settings={"normalize_std": False},  # scripts/run_reinforce_ada.sh L59
)
def reinforce_ada_round(request: AllocationRequest) -> AllocationResult:
    """Reinforce-Ada (RLHFlow/Reinforce-Ada, `_generate_multi_round_adaptive_downsampling`
    in verl/trainer/ppo/ray_trainer.py; lines and deviations in
    `allocation/reinforce_ada.py`): one round's rollouts, N_avg for each prompt still
    sampled. The rounds (until n // 2 successes and n - n // 2 failures, at most 4) and
    the balanced group of n = N_avg rows are the loop's part, `training.steps.sample_step`;
    advantages use every collected reward, without the std division.
    """
    size = request.success_rates.size
    return AllocationResult(np.full(size, request.config.rollouts_per_prompt, np.int64), 0, 0)
