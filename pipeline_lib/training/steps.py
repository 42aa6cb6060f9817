"""The parts of one training step, each a function of values (the engine comes in as an argument).

    sample_step (allocate -> collect, in rounds for refilling strategies)
        -> record status -> update_rows -> update -> sync -> metrics

`loop.py` strings them together; tests call them one by one with a fake engine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from pipeline_lib.allocation import AllocationResult, invalidate_short_histories, reinforce_ada
from pipeline_lib.allocation.strategies import AllocationRequest, Strategy, get_strategy
from pipeline_lib.config import TrainConfig
from pipeline_lib.grpo import effective_gradient_ratio, group_advantages, group_loss_weights
from pipeline_lib.prompts import PromptSet
from pipeline_lib.rewards.sampling import grade, sample_rewards
from pipeline_lib.rollout.base import Completion, GenerationStats, RolloutEngine, SamplingConfig
from pipeline_lib.status import (
    estimate_success_rates,
    expected_tokens,
    record_visit,
    reward_counts,
    visit_streaks,
)
from pipeline_lib.tracking import Tracker
from pipeline_lib.training.plots import allocation_histogram, calibration_plot


def check_step_fits_pool(num_prompts: int, prompts_per_step: int) -> None:
    """Refuse a step larger than the pool: every epoch visits each prompt once, so a step
    cannot draw more distinct prompts than the pool holds (it would silently train on
    the whole pool at a budget nobody asked for)."""
    if prompts_per_step > num_prompts:
        raise ValueError(
            f"train.prompts_per_step {prompts_per_step} exceeds the {num_prompts} prompts of "
            "the training pool: lower train.prompts_per_step or prepare more prompts"
        )


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


def refill_prompts(num_prompts: int, step: int, seed: int, exclude: np.ndarray) -> np.ndarray:
    """Pool indices a refilling strategy draws after the step's own prompts, in order.

    A permutation seeded by (seed, step) without the step's prompts: every strategy's
    step starts from the same prompts (runs stay paired), and no prompt repeats
    within a step.
    """
    order = np.random.default_rng([seed, step, 1]).permutation(num_prompts)
    return order[~np.isin(order, exclude)]


def allocate(
    status: pd.DataFrame,
    ids: Sequence[str],
    config: TrainConfig,
    strategy: str,
    state: Mapping[str, float] | None = None,
    seed: int | None = None,
) -> StepAllocation:
    """Rollouts per prompt for one step (or sampling round) under the named strategy
    (with the settings it fixes: an ablation's rules also decide which estimates count).
    `state` is a stateful strategy's (GRESO's) state, `seed` seeds its draws."""
    started = time.perf_counter()
    chosen = get_strategy(strategy)
    config = chosen.configure(config)
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
    request = AllocationRequest(
        success_rates=predicted,
        tokens_per_rollout=expected_tokens(status, ids, default=config.max_new_tokens),
        budget_rollouts=chosen.budget_rollouts(config),
        config=config,
        state=dict(chosen.initial_state if state is None else state),
    )
    if chosen.skips:  # only a skipping strategy reads visit streaks and draws
        solved, unsolved = visit_streaks(status, ids)
        rng = np.random.default_rng([0 if seed is None else seed, 11])
        request = replace(request, solved_streaks=solved, unsolved_streaks=unsolved, rng=rng)
    return StepAllocation(predicted, chosen.allocate(request), time.perf_counter() - started)


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


def mixed_groups(batch: RolloutBatch) -> np.ndarray:
    """bool[M]: groups whose rewards are not all equal (the ones with a GRPO gradient)."""
    groups, size = batch.group_ids.numpy(), batch.successes.size
    low, high = np.full(size, np.inf), np.full(size, -np.inf)
    np.minimum.at(low, groups, batch.rewards)
    np.maximum.at(high, groups, batch.rewards)
    return high > low


@dataclass(frozen=True)
class StepRollouts:
    """What one step sampled, over every prompt it drew (all rounds, in draw order).

    indices: int[M'] pool indices of the drawn prompts; `allocation` and `batch`
    cover the same M' prompts (batch.group_ids index into them); kept: bool[M'],
    the groups that go into the update; rounds: generation rounds run.
    """

    indices: np.ndarray
    allocation: StepAllocation
    batch: RolloutBatch
    kept: np.ndarray
    rounds: int
    own: int | None = None
    """How many of `indices` (the first ones) are the step's own prompts that were rolled
    out: all of them unless a skipping strategy (GRESO) skipped some; None: all."""
    skipped: int = 0
    """Prompts a skipping strategy drew and did not roll out (no compute spent)."""
    kept_rows: np.ndarray | None = None
    """bool[B]: the rows that go into the update when a strategy trains on part of a
    group (Reinforce-Ada's balanced group); None: every row of the kept groups."""

    @property
    def own_indices(self) -> np.ndarray:
        return self.indices if self.own is None else self.indices[: self.own]


def sample_step(
    engine: RolloutEngine,
    prompts: PromptSet,
    status: pd.DataFrame,
    indices: np.ndarray,
    refill: np.ndarray,
    strategy: str,
    config: TrainConfig,
    sampling: SamplingConfig,
    state: Mapping[str, float] | None = None,
) -> StepRollouts:
    """Allocate and collect one step's rollouts of prompts `indices` under `strategy`.

    A refilling strategy (dynamic sampling, DAPO) then draws prompts_per_step more
    prompts from `refill` per round, until prompts_per_step groups with mixed
    rewards are found or `max_sampling_rounds` rounds have run; the first
    prompts_per_step such groups, in draw order, are kept for the update (DAPO's
    truncation). Otherwise every group is kept (all-equal groups get advantage 0).
    A skipping strategy's prompts with 0 rollouts leave the round before rollout.
    """
    chosen = get_strategy(strategy)
    if chosen.balanced_rounds:
        return _sample_until_balanced(engine, prompts, status, indices, chosen, config, sampling)
    rounds: list[tuple[np.ndarray, StepAllocation, RolloutBatch]] = []
    drawn, queue, found, skipped, own = indices, refill, 0, 0, None
    for round_index in range(config.max_sampling_rounds if chosen.refill else 1):
        if round_index > 0:
            drawn, queue = queue[: config.prompts_per_step], queue[config.prompts_per_step :]
            if drawn.size == 0:  # the pool is used up
                break
        round_sampling = _round_sampling(sampling, round_index)
        ids = [prompts.ids[i] for i in drawn]
        allocation = allocate(status, ids, config, strategy, state, round_sampling.seed)
        if chosen.skips:
            rolled = allocation.rollouts > 0
            skipped += int((~rolled).sum())
            drawn, allocation = drawn[rolled], _subset(allocation, rolled)
        own = drawn.size if own is None else own
        batch = collect(
            engine, prompts, drawn, allocation.rollouts, round_sampling, config.reward_extraction
        )
        rounds.append((drawn, allocation, batch))
        found += int(mixed_groups(batch).sum())
        if found >= config.prompts_per_step:
            break
    drawn, allocation, batch = _concatenate_rounds(rounds)
    if not chosen.refill:
        everything = np.ones(drawn.size, dtype=bool)
        return StepRollouts(drawn, allocation, batch, everything, 1, own, skipped)
    mixed = mixed_groups(batch)
    kept = mixed & (np.cumsum(mixed) <= config.prompts_per_step)
    return StepRollouts(drawn, allocation, batch, kept, len(rounds), own, skipped)


def _sample_until_balanced(
    engine: RolloutEngine,
    prompts: PromptSet,
    status: pd.DataFrame,
    indices: np.ndarray,
    strategy: Strategy,
    config: TrainConfig,
    sampling: SamplingConfig,
) -> StepRollouts:
    """Reinforce-Ada's rounds: the prompts without a balanced group yet get another
    round of their allocation, up to the strategy's `balanced_rounds`; each trains on
    its balanced group of N_avg rows (`allocation.reinforce_ada`)."""
    first = allocate(status, [prompts.ids[i] for i in indices], config, strategy.name)
    group_size = config.rollouts_per_prompt
    rounds: list[tuple[np.ndarray, StepAllocation, RolloutBatch]] = []
    successes, rollouts = np.zeros(indices.size, np.int64), np.zeros(indices.size, np.int64)
    active = np.arange(indices.size)
    for round_index in range(strategy.balanced_rounds):
        per_prompt = first.rollouts[active]
        batch = collect(
            engine,
            prompts,
            indices[active],
            per_prompt,
            _round_sampling(sampling, round_index),
            config.reward_extraction,
        )
        rounds.append((active, _subset(first, active), batch))
        successes[active] += batch.successes.astype(np.int64)
        rollouts[active] += per_prompt
        active = np.flatnonzero(~reinforce_ada.balanced(successes, rollouts, group_size))
        if active.size == 0:
            break
    batch = _merge_into_groups(rounds, indices.size)
    result = AllocationResult(rollouts, 0, 0)
    allocation = StepAllocation(first.predicted, result, first.seconds)
    rows = reinforce_ada.balanced_rows(batch.group_ids.numpy(), batch.rewards >= 0.5, group_size)
    kept = np.ones(indices.size, dtype=bool)
    return StepRollouts(indices, allocation, batch, kept, len(rounds), kept_rows=rows)


def _merge_into_groups(
    rounds: list[tuple[np.ndarray, StepAllocation, RolloutBatch]], num_prompts: int
) -> RolloutBatch:
    """One batch over the step's prompts from rounds that each sampled some of them
    (`positions` into the step's prompts): a prompt's rows, in generation order, form its
    group."""
    groups = torch.cat([torch.from_numpy(pos)[b.group_ids] for pos, _, b in rounds])
    order = torch.argsort(groups, stable=True)  # group by prompt, each in generation order
    completions = [c for _, _, b in rounds for c in b.completions]
    rewards = np.concatenate([b.rewards for _, _, b in rounds])
    successes, tokens = np.zeros(num_prompts), np.zeros(num_prompts)
    for positions, _, b in rounds:
        np.add.at(successes, positions, b.successes)
        np.add.at(tokens, positions, b.tokens)
    stats = [b.stats for _, _, b in rounds if b.stats is not None]
    return RolloutBatch(
        completions=[completions[i] for i in order.tolist()],
        group_ids=groups[order],
        rewards=rewards[order.numpy()],
        successes=successes,
        tokens=tokens,
        stats=_summed_stats(stats),
    )


def _summed_stats(stats: list[GenerationStats]) -> GenerationStats | None:
    if not stats:
        return None
    return GenerationStats(
        sum(s.num_completions for s in stats),
        sum(s.num_generated_tokens for s in stats),
        sum(s.seconds for s in stats),
    )


def _subset(allocation: StepAllocation, rows: np.ndarray) -> StepAllocation:
    """The allocation of the prompts `rows` (a bool[M] mask or indices) only."""
    result = allocation.result
    return StepAllocation(
        allocation.predicted[rows],
        AllocationResult(result.rollouts[rows], result.fallback_rollouts, result.knapsack_budget),
        allocation.seconds,
    )


def zero_variance_shares(batch: RolloutBatch) -> tuple[float, float]:
    """(all correct, all wrong): the shares of a step's rolled-out groups with no gradient."""
    groups = batch.successes.size
    if groups == 0:
        return 0.0, 0.0
    rollouts = np.bincount(batch.group_ids.numpy(), minlength=groups)
    solved = float(np.mean(batch.successes == rollouts))
    unsolved = float(np.mean(batch.successes == 0))
    return solved, unsolved


def strategy_state(history: Sequence[Mapping[str, float]], strategy: str) -> dict[str, float]:
    """A stateful strategy's state after the last step (`strategy/<key>` in the metric
    history, so a resumed run continues it), or its initial state."""
    initial = get_strategy(strategy).initial_state
    if history:
        last = history[-1]
        if all(f"strategy/{key}" in last for key in initial):
            return {key: float(last[f"strategy/{key}"]) for key in initial}
    return dict(initial)


def _round_sampling(sampling: SamplingConfig, round_index: int) -> SamplingConfig:
    """Round 0 samples with the step's seed (as every strategy does); later rounds with
    seeds derived from it."""
    if round_index == 0 or sampling.seed is None:
        return sampling
    seed = np.random.SeedSequence([sampling.seed, round_index]).generate_state(1)[0]
    return replace(sampling, seed=int(seed))


def _concatenate_rounds(
    rounds: list[tuple[np.ndarray, StepAllocation, RolloutBatch]],
) -> tuple[np.ndarray, StepAllocation, RolloutBatch]:
    """One (indices, allocation, batch) over the prompts of every round, in draw order."""
    if len(rounds) == 1:
        return rounds[0]
    allocations = [allocation for _, allocation, _ in rounds]
    batches = [batch for _, _, batch in rounds]
    offsets = np.cumsum([0] + [len(drawn) for drawn, _, _ in rounds])[:-1]
    allocation = StepAllocation(
        predicted=np.concatenate([a.predicted for a in allocations]),
        result=AllocationResult(
            np.concatenate([a.rollouts for a in allocations]),
            sum(a.result.fallback_rollouts for a in allocations),
            sum(a.result.knapsack_budget for a in allocations),
        ),
        seconds=sum(a.seconds for a in allocations),
    )
    stats = [b.stats for b in batches if b.stats is not None]
    batch = RolloutBatch(
        completions=[c for b in batches for c in b.completions],
        group_ids=torch.cat([b.group_ids + int(o) for b, o in zip(batches, offsets, strict=True)]),
        rewards=np.concatenate([b.rewards for b in batches]),
        successes=np.concatenate([b.successes for b in batches]),
        tokens=np.concatenate([b.tokens for b in batches]),
        stats=_summed_stats(stats),
    )
    return np.concatenate([drawn for drawn, _, _ in rounds]), allocation, batch


def update_rows(
    rollouts: StepRollouts, config: TrainConfig
) -> tuple[list[Completion], torch.Tensor]:
    """The completions of the kept groups and their GRPO advantages float[B_kept]."""
    rows = rollouts.kept[rollouts.batch.group_ids.numpy()]
    if rollouts.kept_rows is not None:
        rows = rows & rollouts.kept_rows
    completions = [c for c, keep in zip(rollouts.batch.completions, rows, strict=True) if keep]
    return completions, advantages(rollouts.batch, config)[torch.from_numpy(rows)]


def record_status(
    status: pd.DataFrame,
    epoch: int,
    ids: Sequence[str],
    allocation: StepAllocation,
    batch: RolloutBatch,
    config: TrainConfig,
) -> pd.DataFrame:
    """The status table with this visit of each of the step's prompts `ids` added.

    `ids` name the first len(ids) prompts of `allocation` and `batch`: the step's own.
    Prompts a refilling strategy drew in later rounds lie outside the epoch's order
    (they may come up again this epoch), so they are spent compute and update
    data, not visits.
    """
    own = len(ids)
    return record_visit(
        status,
        epoch,
        list(ids),
        allocation.rollouts[:own],
        batch.successes[:own].astype(np.int64),
        tokens=batch.tokens[:own].astype(np.int64),
        beta_decay=config.beta_decay,
    )


def advantages(batch: RolloutBatch, config: TrainConfig) -> torch.Tensor:
    """GRPO advantages float[B], normalised within each prompt's group; under
    `group_weighting: equal` scaled by N_avg / group size (`grpo.group_loss_weights`)."""
    values = group_advantages(
        torch.tensor(batch.rewards, dtype=torch.float32),
        batch.group_ids,
        normalize_std=config.normalize_std,
        clip=config.advantage_clip,
    )
    if config.group_weighting == "equal":
        values = values * group_loss_weights(batch.group_ids, config.rollouts_per_prompt)
    return values


def heldout_prompt_scores(
    engine: RolloutEngine,
    heldout: PromptSet,
    sampling: SamplingConfig,
    samples_per_prompt: int,
    extraction: str,
) -> np.ndarray:
    """float[M]: each held-out prompt's mean reward over `samples_per_prompt` samples."""
    return sample_rewards(engine, heldout, sampling, samples_per_prompt, extraction).mean(axis=1)


def heldout_accuracy(
    engine: RolloutEngine,
    heldout: PromptSet,
    sampling: SamplingConfig,
    samples_per_prompt: int,
    extraction: str,
) -> float:
    """Mean reward over `samples_per_prompt` samples of every held-out prompt."""
    scores = heldout_prompt_scores(engine, heldout, sampling, samples_per_prompt, extraction)
    return float(scores.mean())


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
    """Per-epoch plots: the allocation histogram and p-calibration (predicted vs realised).

    `add` only records (it runs inside the timed step); drawing an epoch's plots takes
    about a second, so the loop calls `log_finished` after the step's clock stopped.
    """

    epoch: int | None = None
    predicted: list[np.ndarray] = field(default_factory=list)
    realised: list[np.ndarray] = field(default_factory=list)
    rollouts: list[np.ndarray] = field(default_factory=list)
    finished: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    """Epochs recorded in full and not yet logged: (epoch, rollouts, predicted, realised)."""

    def add(self, epoch: int, allocation: StepAllocation, batch: RolloutBatch) -> None:
        """Record a step; a step of a new epoch first closes the previous epoch."""
        if self.epoch is not None and epoch != self.epoch:
            self._finish_epoch()
        self.epoch = epoch
        seen = ~np.isnan(allocation.predicted)
        self.predicted.append(allocation.predicted[seen])
        self.realised.append(batch.successes[seen] / allocation.rollouts[seen])
        self.rollouts.append(allocation.rollouts)

    def log_finished(self, tracker: Tracker) -> None:
        """Log the plots of every closed epoch."""
        for epoch, rollouts, predicted, realised in self.finished:
            tracker.log_figure(
                allocation_histogram(rollouts, title=f"Rollouts per prompt, epoch {epoch}"),
                f"plots/allocation/epoch_{epoch:03d}.png",
            )
            if predicted.size:
                tracker.log_figure(
                    calibration_plot(predicted, realised, title=f"Calibration, epoch {epoch}"),
                    f"plots/calibration/epoch_{epoch:03d}.png",
                )
        self.finished = []

    def flush(self, tracker: Tracker) -> None:
        """Close the current epoch (if it has steps) and log every closed one."""
        self._finish_epoch()
        self.log_finished(tracker)

    def _finish_epoch(self) -> None:
        if self.epoch is None or not self.rollouts:
            return
        self.finished.append(
            (
                self.epoch,
                np.concatenate(self.rollouts),
                np.concatenate(self.predicted),
                np.concatenate(self.realised),
            )
        )
        self.predicted, self.realised, self.rollouts = [], [], []
