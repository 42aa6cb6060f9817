"""The parts of a training step, one by one, on an in-memory engine with known rewards."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_lib.config import TrainConfig
from pipeline_lib.prompts import PromptSet
from pipeline_lib.rollout.base import Completion, GenerationStats, SamplingConfig
from pipeline_lib.status import empty_status
from pipeline_lib.training.compute import StepSeconds, accumulate, step_compute
from pipeline_lib.training.steps import (
    advantages,
    allocate,
    check_step_fits_pool,
    collect,
    heldout_accuracy,
    record_status,
    refill_prompts,
    sample_step,
    step_metrics,
    update_rows,
)


class ScriptedEngine:
    """A rollout engine whose prompt i succeeds on its first `successes[i]` samples.

    Prompt i's token ids are [i]; a success answers with the reference, a failure with "x".
    """

    def __init__(self, answers: list[str], successes: list[int]):
        self.answers, self.successes, self.calls, self.seeds = answers, successes, [], []
        self.last_stats: GenerationStats | None = None

    def generate(self, prompt_token_ids, n_per_prompt, sampling):
        self.calls.append(list(n_per_prompt))
        self.seeds.append(sampling.seed)
        groups = []
        for position, (prompt, n) in enumerate(zip(prompt_token_ids, n_per_prompt, strict=True)):
            index = prompt[0]
            texts = [self.answers[index] if k < self.successes[index] else "x" for k in range(n)]
            groups.append([Completion(position, prompt, [3], [-0.1], t, True) for t in texts])
        self.last_stats = GenerationStats(sum(n_per_prompt), sum(n_per_prompt), 0.5)
        return groups

    def update_weights(self, state_dict):
        pass

    def close(self):
        pass


@pytest.fixture()
def prompts():
    return PromptSet([f"p{i}" for i in range(4)], [[i] for i in range(4)], ["1", "2", "3", "4"])


CONFIG = TrainConfig(prompts_per_step=4, rollouts_per_prompt=4, max_rollouts=16)


def test_collect_grades_each_rollout_and_counts_successes_per_prompt(prompts):
    engine = ScriptedEngine(prompts.answers, successes=[0, 2, 4, 1])
    batch = collect(
        engine,
        prompts,
        np.array([2, 1, 0, 3]),
        np.array([4, 4, 4, 4]),
        SamplingConfig(max_new_tokens=2),
        "last_number",
    )
    assert batch.successes.tolist() == [4, 2, 0, 1]  # in the step's prompt order
    assert batch.rewards.tolist() == [1] * 4 + [1, 1, 0, 0] + [0] * 4 + [1, 0, 0, 0]
    assert batch.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    adv = advantages(batch, CONFIG)
    assert adv[:4].eq(0).all() and adv[8:12].eq(0).all()  # all-equal groups: no signal
    assert adv[4] > 0 > adv[6]


def test_first_visit_is_uniform_then_knapsack_moves_budget_to_mixed_prompts(prompts):
    engine = ScriptedEngine(prompts.answers, successes=[0, 2, 4, 1])
    ids, indices = prompts.ids, np.arange(4)
    status = empty_status()
    first = allocate(status, ids, CONFIG, "knapsack")
    assert np.isnan(first.predicted).all() and first.rollouts.tolist() == [4, 4, 4, 4]

    batch = collect(
        engine, prompts, indices, first.rollouts, SamplingConfig(max_new_tokens=2), "last_number"
    )
    status = record_status(status, 0, ids, first, batch, CONFIG)
    second = allocate(status, ids, CONFIG, "knapsack")
    assert second.predicted.tolist() == [0.0, 0.5, 1.0, 0.25]
    assert second.rollouts.sum() == 16  # the same budget
    assert second.rollouts[2] == CONFIG.min_rollouts  # solved: no value
    assert second.rollouts[1] + second.rollouts[3] >= 8  # mixed prompts get the most

    metrics = step_metrics(second, batch, sync_seconds=0.01)
    assert metrics["alloc/zero_value_prompts"] == 2
    assert metrics["rollout/effective_gradient_ratio"] == pytest.approx(0.5)
    assert metrics["rollout/tokens_per_s"] == pytest.approx(32.0)


def test_heldout_accuracy_is_the_mean_reward_over_samples(prompts):
    engine = ScriptedEngine(prompts.answers, successes=[0, 1, 2, 2])
    accuracy = heldout_accuracy(engine, prompts, SamplingConfig(max_new_tokens=2), 2, "last_number")
    assert accuracy == pytest.approx(5 / 8)
    assert engine.calls == [[2, 2, 2, 2]]


# Dynamic sampling on a pool of 12 prompts, 4 per step, N_avg = 4: prompt i succeeds
# on its first SUCCESSES[i] of 4 samples, so its group is mixed iff 0 < SUCCESSES[i] < 4.
SUCCESSES = [0, 4, 2, 0, 4, 1, 0, 4, 3, 2, 2, 1]
#   round 0: prompts 0-3, mixed: 2          (1 found)
#   round 1: prompts 4-7, mixed: 5          (2 found)
#   round 2: prompts 8-11, mixed: 8 9 10 11 (6 found >= 4: stop; keep 2 5 8 9)


@pytest.fixture()
def pool():
    return PromptSet(
        [f"p{i}" for i in range(12)], [[i] for i in range(12)], [str(i + 1) for i in range(12)]
    )


def sample(pool, strategy, config=CONFIG, refill=None, successes=SUCCESSES):
    engine = ScriptedEngine(pool.answers, successes)
    rollouts = sample_step(
        engine,
        pool,
        empty_status(),
        np.arange(4),
        np.arange(4, 12) if refill is None else refill,
        strategy,
        config,
        SamplingConfig(max_new_tokens=2, seed=7),
    )
    return engine, rollouts


def test_dynamic_sampling_refills_until_enough_mixed_groups_and_counts_every_rollout(pool):
    engine, rollouts = sample(pool, "dynamic-sampling")
    assert engine.calls == [[4, 4, 4, 4]] * 3
    assert engine.seeds[0] == 7 and len(set(engine.seeds)) == 3  # round 0 as every strategy
    assert rollouts.rounds == 3 and rollouts.indices.tolist() == list(range(12))
    assert np.flatnonzero(rollouts.kept).tolist() == [2, 5, 8, 9]  # first 4 mixed, in order
    assert rollouts.batch.successes.tolist() == SUCCESSES
    completions, row_advantages = update_rows(rollouts, CONFIG)
    assert len(completions) == 16 and row_advantages.ne(0).all()
    assert [c.prompt_token_ids[0] for c in completions[::4]] == [2, 5, 8, 9]

    spent = step_compute(rollouts, completions, row_advantages, StepSeconds(1.0, 2.0, 0.5))
    assert spent["compute/rollouts"] == 48  # dropped groups are paid for
    assert spent["compute/completion_tokens"] == 48  # one token per scripted completion
    assert spent["compute/prompt_tokens"] == 12  # each drawn prompt once
    assert spent["compute/update_rows"] == 16 and spent["compute/update_signal_rows"] == 16
    assert spent["compute/update_tokens"] == 32  # prompt + completion
    assert spent["update/groups"] == 4 and spent["rollout/prompts"] == 12
    metrics = step_metrics(rollouts.allocation, rollouts.batch, sync_seconds=0.5)
    assert metrics["rollout/effective_gradient_ratio"] == pytest.approx(6 / 12)
    assert metrics["rollout/tokens"] == 48  # the rounds' engine stats, summed

    own = pool.ids[:4]
    status = record_status(empty_status(), 0, own, rollouts.allocation, rollouts.batch, CONFIG)
    # Only the step's own prompts are visits: refills may come up again this epoch.
    assert status["prompt_id"].tolist() == own
    assert status["total_rollouts"].sum() == 16


def test_dynamic_sampling_stops_at_the_round_cap_or_an_empty_pool(pool):
    capped = CONFIG.model_copy(update={"max_sampling_rounds": 2})
    engine, rollouts = sample(pool, "dynamic-sampling", config=capped)
    assert rollouts.rounds == 2 and len(engine.calls) == 2
    assert np.flatnonzero(rollouts.kept).tolist() == [2, 5]
    assert len(update_rows(rollouts, capped)[0]) == 8

    engine, rollouts = sample(pool, "dynamic-sampling", refill=np.arange(0))
    assert rollouts.rounds == 1 and rollouts.kept.sum() == 1

    engine, rollouts = sample(pool, "dynamic-sampling", successes=[0] * 12)
    assert rollouts.rounds == 3  # the pool ran out before max_sampling_rounds
    assert rollouts.kept.sum() == 0 and update_rows(rollouts, CONFIG)[0] == []


# With 8 samples prompt 1 (4 successes) is mixed too.
@pytest.mark.parametrize(
    ("strategy", "per_prompt", "signal_rows"), [("uniform", 4, 4), ("uniform-2x", 8, 16)]
)
def test_other_strategies_sample_once_and_keep_every_group(pool, strategy, per_prompt, signal_rows):
    engine, rollouts = sample(pool, strategy)
    assert engine.calls == [[per_prompt] * 4]
    assert rollouts.rounds == 1 and rollouts.kept.all()
    completions, _ = update_rows(rollouts, CONFIG)
    assert len(completions) == 4 * per_prompt
    spent = step_compute(
        rollouts, completions, advantages(rollouts.batch, CONFIG), StepSeconds(0, 0, 0)
    )
    assert spent["compute/rollouts"] == 4 * per_prompt
    assert spent["compute/update_signal_rows"] == signal_rows


def test_refill_prompts_skip_the_steps_own_and_depend_on_seed_and_step():
    own = np.array([3, 1, 4])
    refill = refill_prompts(10, step=5, seed=0, exclude=own)
    assert sorted(refill.tolist()) == [0, 2, 5, 6, 7, 8, 9]
    assert refill.tolist() == refill_prompts(10, 5, 0, own).tolist()
    assert refill.tolist() != refill_prompts(10, 6, 0, own).tolist()


def test_cumulative_compute_adds_to_the_previous_record_and_sums_seconds():
    step = {f"compute/{k}": 1.0 for k in ("rollouts", "prompt_tokens", "completion_tokens")}
    step |= {f"compute/{k}": 2.0 for k in ("update_rows", "update_signal_rows", "update_tokens")}
    step |= {"compute/rollout_seconds": 3.0, "compute/update_seconds": 4.0}
    step |= {"compute/sync_seconds": 0.5}
    first = accumulate(
        {"step": 0, "eval/accuracy": 0.3, "compute/rollouts_total": float("nan")}, step
    )
    assert first["compute/rollouts_total"] == 1.0 and first["compute/seconds_total"] == 7.5
    second = accumulate(first, step)
    assert second["compute/update_tokens_total"] == 4.0
    assert second["compute/seconds_total"] == 15.0


def test_a_step_must_fit_the_pool():
    check_step_fits_pool(64, 64)
    with pytest.raises(ValueError, match="prompts_per_step 65 exceeds the 64 prompts"):
        check_step_fits_pool(64, 65)
