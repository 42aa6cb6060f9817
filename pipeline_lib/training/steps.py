"""The parts of one training step, each a function of values (the engine comes in as an argument).

    allocate -> collect (rollout + grade) -> record status -> update -> sync -> metrics

`loop.py` strings them together; tests call them one by one with a fake engine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from pipeline_lib.allocation import (
    AllocationResult,
    allocate_rollouts,
    allocate_rollouts_by_tokens,
    invalidate_short_histories,
)
from pipeline_lib.config import TrainConfig
from pipeline_lib.grpo import effective_gradient_ratio, group_advantages
from pipeline_lib.plots import allocation_histogram, calibration_plot
from pipeline_lib.prompts import PromptSet
from pipeline_lib.rollout.base import Completion, GenerationStats, RolloutEngine, SamplingConfig
from pipeline_lib.scoring import grade, sample_rewards
from pipeline_lib.status import (
    estimate_success_rates,
    expected_tokens,
    record_visit,
    reward_counts,
)
from pipeline_lib.tracking import Tracker


def step_prompts(
    num_prompts: int, step: int, prompts_per_step: int, seed: int
) -> tuple[int, np.ndarray]:
    """(epoch, prompt indices) of a step: each epoch visits the pool once in a seeded order."""
    steps_per_epoch = max(num_prompts // prompts_per_step, 1)
    epoch, offset = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
    start = offset * prompts_per_step
    return epoch, order[start : start + prompts_per_step]


@dataclass(frozen=True)
class StepAllocation:
    """What the allocator saw and decided for one step's prompts."""

    predicted: np.ndarray  # float[M] success-rate estimates, NaN for unseen prompts
    result: AllocationResult
    seconds: float

    @property
    def rollouts(self) -> np.ndarray:
        return self.result.rollouts


def allocate(
    status: pd.DataFrame, ids: Sequence[str], config: TrainConfig, strategy: str
) -> StepAllocation:
    """Rollouts per prompt for one step at the budget prompts_per_step x N_avg."""
    started = time.perf_counter()
    prior_alpha, prior_beta = config.beta_prior
    predicted = estimate_success_rates(
        status,
        list(ids),
        method=config.status_estimator,
        prior_alpha=prior_alpha,
        prior_beta=prior_beta,
    )
    predicted = invalidate_short_histories(
        predicted, reward_counts(status, ids), config.buffer_length
    )
    if config.budget_unit == "tokens" and strategy == "knapsack":
        costs = expected_tokens(status, ids, default=config.max_new_tokens)
        result = allocate_rollouts_by_tokens(
            predicted,
            costs,
            config.prompts_per_step * config.rollouts_per_prompt * float(costs.mean()),
            min_rollouts=config.min_rollouts,
            max_rollouts=config.max_rollouts,
            unseen_rollouts=config.rollouts_per_prompt,
        )
        return StepAllocation(predicted, result, time.perf_counter() - started)
    result = allocate_rollouts(
        predicted,
        config.prompts_per_step * config.rollouts_per_prompt,
        strategy=strategy,  # type: ignore[arg-type]
        rules=config.allocation_rules,
        min_rollouts=config.min_rollouts,
        max_rollouts=config.max_rollouts,
        unseen_rollouts=config.rollouts_per_prompt,
        negative_rollouts=config.unsolved_rollouts,
        positive_rollouts=config.solved_rollouts,
        fallback_confidence=config.fallback_confidence,
        cost_estimate=config.fallback_cost,
    )
    return StepAllocation(predicted, result, time.perf_counter() - started)


@dataclass(frozen=True)
class RolloutBatch:
    """One step's graded rollouts, flat, with the group (prompt position) of each.

    completions: B completions; group_ids: LongTensor[B]; rewards: float[B];
    successes: float[M] rewards >= 0.5 per prompt (M = prompts in the step);
    tokens: float[M] completion tokens generated per prompt.
    """

    completions: list[Completion]
    group_ids: torch.Tensor
    rewards: np.ndarray
    successes: np.ndarray
    tokens: np.ndarray
    stats: GenerationStats | None


def collect(
    engine: RolloutEngine,
    prompts: PromptSet,
    indices: np.ndarray,
    rollouts: np.ndarray,
    sampling: SamplingConfig,
    extraction: str,
) -> RolloutBatch:
    """Sample `rollouts[i]` completions of prompt `indices[i]` and grade them."""
    groups = engine.generate([prompts.token_ids[i] for i in indices], rollouts.tolist(), sampling)
    stats = engine.last_stats
    flat = [c for group in groups for c in group]
    group_ids = torch.tensor([c.prompt_index for c in flat], dtype=torch.long)
    rewards = grade(flat, [prompts.answers[indices[c.prompt_index]] for c in flat], extraction)
    successes = np.bincount(group_ids.numpy(), weights=rewards >= 0.5, minlength=len(indices))
    lengths = np.array([len(c.token_ids) for c in flat], dtype=np.float64)
    tokens = np.bincount(group_ids.numpy(), weights=lengths, minlength=len(indices))
    return RolloutBatch(flat, group_ids, rewards, successes, tokens, stats)


def record_status(
    status: pd.DataFrame,
    epoch: int,
    ids: Sequence[str],
    allocation: StepAllocation,
    batch: RolloutBatch,
    config: TrainConfig,
) -> pd.DataFrame:
    """The status table with this visit of every prompt of the step added."""
    return record_visit(
        status,
        epoch,
        list(ids),
        allocation.rollouts,
        batch.successes.astype(np.int64),
        tokens=batch.tokens.astype(np.int64),
        beta_decay=config.beta_decay,
    )


def advantages(batch: RolloutBatch, config: TrainConfig) -> torch.Tensor:
    """GRPO advantages float[B], normalised within each prompt's group."""
    return group_advantages(
        torch.tensor(batch.rewards, dtype=torch.float32),
        batch.group_ids,
        normalize_std=config.normalize_std,
        clip=config.advantage_clip,
    )


def heldout_accuracy(
    engine: RolloutEngine,
    heldout: PromptSet,
    sampling: SamplingConfig,
    samples_per_prompt: int,
    extraction: str,
) -> float:
    """Mean reward over `samples_per_prompt` samples of every held-out prompt."""
    return float(sample_rewards(engine, heldout, sampling, samples_per_prompt, extraction).mean())


def step_metrics(
    allocation: StepAllocation, batch: RolloutBatch, sync_seconds: float
) -> dict[str, float]:
    """The step's `alloc/`, `rollout/` and `sync/` metrics (the updater reports `train/`)."""
    predicted, rollouts = allocation.predicted, allocation.rollouts
    stats = batch.stats
    return {
        "alloc/mean_rollouts": float(rollouts.mean()),
        "alloc/max_rollouts": float(rollouts.max()),
        "alloc/zero_value_prompts": float(((predicted == 0) | (predicted == 1)).sum()),
        "alloc/unseen_prompts": float(np.isnan(predicted).sum()),
        "alloc/fallback_rollouts": float(allocation.result.fallback_rollouts),
        "alloc/seconds": allocation.seconds,
        "rollout/success_rate": float(batch.rewards.mean()),
        "rollout/effective_gradient_ratio": effective_gradient_ratio(
            torch.tensor(batch.rewards, dtype=torch.float32), batch.group_ids
        ),
        "rollout/tokens": float(stats.num_generated_tokens if stats else 0),
        "rollout/tokens_per_s": float(stats.tokens_per_second if stats else 0),
        "rollout/seconds": float(stats.seconds if stats else 0),
        "sync/seconds": sync_seconds,
    }


@dataclass
class EpochDiagnostics:
    """Per-epoch plots: the allocation histogram and p-calibration (predicted vs realised)."""

    epoch: int | None = None
    predicted: list[np.ndarray] = field(default_factory=list)
    realised: list[np.ndarray] = field(default_factory=list)
    rollouts: list[np.ndarray] = field(default_factory=list)

    def add(self, epoch: int, allocation: StepAllocation, batch: RolloutBatch, tracker: Tracker):
        """Record a step; a step of a new epoch first logs the finished epoch's plots."""
        if self.epoch is not None and epoch != self.epoch:
            self.flush(tracker)
        self.epoch = epoch
        seen = ~np.isnan(allocation.predicted)
        self.predicted.append(allocation.predicted[seen])
        self.realised.append(batch.successes[seen] / allocation.rollouts[seen])
        self.rollouts.append(allocation.rollouts)

    def flush(self, tracker: Tracker) -> None:
        """Log the current epoch's plots (if it has steps) and start over."""
        if self.epoch is None or not self.rollouts:
            return
        tracker.log_figure(
            allocation_histogram(
                np.concatenate(self.rollouts), title=f"Rollouts per prompt, epoch {self.epoch}"
            ),
            f"plots/allocation/epoch_{self.epoch:03d}.png",
        )
        seen_predicted = np.concatenate(self.predicted)
        if seen_predicted.size:
            tracker.log_figure(
                calibration_plot(
                    seen_predicted,
                    np.concatenate(self.realised),
                    title=f"Calibration, epoch {self.epoch}",
                ),
                f"plots/calibration/epoch_{self.epoch:03d}.png",
            )
        self.predicted, self.realised, self.rollouts = [], [], []
