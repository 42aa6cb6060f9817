"""Rollout-allocation strategies: how one training step spends its rollouts.

A strategy is one function of one `AllocationRequest` (the step's success-rate
estimates, expected tokens per rollout, its budget and the settings) returning
an `AllocationResult` (rollouts per prompt), registered under its name with two
facts the training loop needs:

- `budget_multiplier`: the step's budget is multiplier x prompts_per_step x N_avg
  rollouts (`uniform-2x` spends twice what the others spend);
- `refill`: the step samples in rounds (DAPO's dynamic sampling, see
  `training.steps.sample_step`): each round draws prompts_per_step new prompts,
  allocates them with the function, and the step stops once prompts_per_step
  groups with mixed rewards are found or after `max_sampling_rounds` rounds.
  Every round's rollouts count as spent compute; only the kept groups go into
  the update.

Adding a strategy is one decorated function here, its name in
`config.StrategyName` (so params.yaml rejects unknown names before any compute)
and a test of its budget arithmetic in tests/test_strategies.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline_lib.allocation import (
    AllocationResult,
    AllocationRules,
    RolloutValue,
    allocate_rollouts,
    allocate_rollouts_by_tokens,
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


AllocateFn = Callable[[AllocationRequest], AllocationResult]


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its allocation function and how the loop runs it."""

    name: str
    allocate: AllocateFn
    budget_multiplier: int = 1
    refill: bool = False

    def budget_rollouts(self, config: TrainConfig) -> int:
        """The step's (or each round's) rollout budget."""
        return self.budget_multiplier * config.prompts_per_step * config.rollouts_per_prompt


STRATEGIES: dict[str, Strategy] = {}


def register(
    name: str, *, budget_multiplier: int = 1, refill: bool = False
) -> Callable[[AllocateFn], AllocateFn]:
    """Decorator: register `function` as strategy `name` (stackable: one function, two names)."""

    def add(function: AllocateFn) -> AllocateFn:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = Strategy(name, function, budget_multiplier, refill)
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


def _knapsack_policy(
    request: AllocationRequest,
    *,
    rules: AllocationRules | None = None,
    fallback: bool = True,
    value: RolloutValue = "info_gain",
) -> AllocationResult:
    """`allocate_rollouts` with the configured rules; the arguments override one setting."""
    config = request.config
    return allocate_rollouts(
        request.success_rates,
        request.budget_rollouts,
        strategy="knapsack",
        rules=config.allocation_rules if rules is None else rules,
        min_rollouts=config.min_rollouts,
        max_rollouts=config.max_rollouts,
        unseen_rollouts=config.rollouts_per_prompt,
        negative_rollouts=config.unsolved_rollouts,
        positive_rollouts=config.solved_rollouts,
        fallback_confidence=config.fallback_confidence if fallback else None,
        cost_estimate=config.fallback_cost,
        value=value,
    )


@register("knapsack")
def knapsack(request: AllocationRequest) -> AllocationResult:
    """Knapsack RL at B = prompts_per_step x N_avg, with the configured rules and fallback.

    `budget_unit: tokens` spends as many expected completion tokens instead (exact
    rules, no fallback); the ablations below always count rollouts.
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
    return _knapsack_policy(request)


@register("uniform-2x", budget_multiplier=2)
@register("uniform")
def uniform(request: AllocationRequest) -> AllocationResult:
    """The budget split evenly: N_avg each (uniform), 2 N_avg each (uniform-2x)."""
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


@register("knapsack-no-fallback")
def knapsack_no_fallback(request: AllocationRequest) -> AllocationResult:
    """Ablation: knapsack with the surplus left to the optimiser (no move to p = 0 prompts)."""
    return _knapsack_policy(request, fallback=False)


@register("knapsack-gradient-only")
def knapsack_gradient_only(request: AllocationRequest) -> AllocationResult:
    """Ablation: value = P(non-zero gradient) = 1 - p^N - (1-p)^N, no InfoGain weight.

    Exact rules whatever `allocation_rules` says (the official rules value by V only).
    """
    return _knapsack_policy(request, rules="exact", value="gradient")


@register("knapsack-official")
def knapsack_official(request: AllocationRequest) -> AllocationResult:
    """Ablation: the paper code's allocation rules (`allocation.py` lists every difference)."""
    return _knapsack_policy(request, rules="official")
