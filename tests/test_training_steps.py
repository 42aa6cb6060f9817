"""The parts of a training step, one by one, on an in-memory engine with known rewards."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_lib.allocation import greso, reinforce_ada
from pipeline_lib.allocation.strategies import get_strategy
from pipeline_lib.config import TrainConfig
from pipeline_lib.prompts import PromptSet
from pipeline_lib.rollout.base import Completion, GenerationStats, SamplingConfig
from pipeline_lib.status import empty_status, record_visit, visit_streaks
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
    strategy_state,
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


def test_greso_skips_zero_variance_prompts_before_rollout_and_pays_only_for_rolled_ones(pool):
    """Prompts 0 and 3 failed their last 3 visits, prompt 1 solved them, prompt 2 was mixed;
    with exploration probabilities 0 they are kept with GRESO's floor 0.01 only."""
    status = empty_status()
    history = {0: 0, 1: 4, 2: 2, 3: 0}  # successes of 4 rollouts, every epoch
    for epoch in range(3):
        status = record_visit(status, epoch, pool.ids[:4], [4] * 4, list(history.values()))
    solved, unsolved = visit_streaks(status, pool.ids[:4])
    assert solved.tolist() == [0, 3, 0, 0] and unsolved.tolist() == [3, 0, 0, 3]
    engine = ScriptedEngine(pool.answers, SUCCESSES)
    state = {"p_easy": 0.0, "p_hard": 0.0}
    rollouts = sample_step(
        engine, pool, status, np.arange(4), np.arange(4, 12), "greso", CONFIG,
        SamplingConfig(max_new_tokens=2, seed=7), state,
    )  # fmt: skip
    # The draws replayed: skipped where a uniform draw is >= the keep probability.
    keep = greso.keep_probabilities(solved, unsolved, state)
    np.testing.assert_allclose(keep, [0.01, 0.01, 1.0, 0.01])
    skipped = np.random.default_rng([7, 11]).random(4) >= keep
    assert skipped.tolist() == [True, True, False, True]  # this seed keeps no floor prompt
    assert rollouts.skipped == 3 and rollouts.own == 1
    assert rollouts.own_indices.tolist() == [2]
    # Round 0 rolls out prompt 2 only; refills (no history: always kept) as dynamic sampling.
    assert engine.calls == [[4], [4, 4, 4, 4], [4, 4, 4, 4]]
    assert rollouts.indices.tolist() == [2, *range(4, 12)]
    completions, row_advantages = update_rows(rollouts, CONFIG)
    spent = step_compute(rollouts, completions, row_advantages, StepSeconds(1.0, 1.0, 0.0))
    assert spent["compute/rollouts"] == 36  # 9 prompts x 4: the skipped cost nothing
    assert np.flatnonzero(rollouts.kept).tolist() == [0, 2, 5, 6]  # prompts 2, 5, 8, 9
    recorded = record_status(
        status, 3, [pool.ids[i] for i in rollouts.own_indices], rollouts.allocation,
        rollouts.batch, CONFIG,
    )  # fmt: skip
    visits = recorded.set_index("prompt_id")["visits"].to_dict()
    assert visits == {"p0": 3, "p1": 3, "p2": 4, "p3": 3}  # skipped prompts: no visit


def test_greso_never_skips_unseen_or_mixed_prompts_and_spends_n_avg_on_the_rest(pool):
    engine, rollouts = sample(pool, "greso")  # empty status: nothing to skip
    assert rollouts.skipped == 0 and engine.calls[0] == [4, 4, 4, 4]
    assert np.flatnonzero(rollouts.kept).tolist() == [2, 5, 8, 9]  # as dynamic sampling


def test_greso_keep_probabilities_and_their_adaptation_follow_its_code():
    state = {"p_easy": 0.5, "p_hard": 0.8}
    keep = greso.keep_probabilities(np.array([0, 1, 3, 0, 0]), np.array([0, 0, 0, 2, 30]), state)
    np.testing.assert_allclose(keep, [1.0, 0.5, 0.125, 0.64, 0.01])  # floor 0.01
    # Targets: solved share alpha / 3 = 0.0833, unsolved 2 alpha / 3 = 0.1667 (alpha 0.25).
    assert greso.adapt_keep(state, 0, 0.9, 0.9) == state  # first epoch: unchanged
    moved = greso.adapt_keep(state, 1, 0.10, 0.10)  # many solved (skip more), few unsolved
    assert moved == pytest.approx({"p_easy": 0.49, "p_hard": 0.81})
    assert greso.adapt_keep({"p_easy": 0.05, "p_hard": 0.95}, 2, 0.5, 0.0) == pytest.approx(
        {"p_easy": 0.05, "p_hard": 0.95}
    )  # clamped to [0.05, 0.95]


def test_a_strategys_state_is_read_back_from_the_last_history_record():
    assert strategy_state([], "greso") == {"p_easy": 0.5, "p_hard": 0.5}
    history = [{"step": 3, "strategy/p_easy": 0.47, "strategy/p_hard": 0.52}]
    assert strategy_state(history, "greso") == {"p_easy": 0.47, "p_hard": 0.52}
    assert strategy_state(history, "uniform") == {}


def test_reinforce_ada_resamples_unbalanced_prompts_and_trains_on_balanced_groups(pool):
    """Prompts 0-3 succeed on 0, 4, 2, 0 of every 4 samples: prompt 2 holds 2 successes
    and 2 failures after one round; the others never do and are sampled 4 rounds."""
    engine, rollouts = sample(pool, "reinforce-ada")
    assert engine.calls == [[4, 4, 4, 4], [4, 4, 4], [4, 4, 4], [4, 4, 4]]
    assert rollouts.rounds == 4 and rollouts.indices.tolist() == [0, 1, 2, 3]
    assert rollouts.allocation.rollouts.tolist() == [16, 16, 4, 16]
    assert rollouts.batch.successes.tolist() == [0, 16, 2, 0]
    groups = rollouts.batch.group_ids.tolist()
    assert groups == sorted(groups) and groups.count(2) == 4  # grouped by prompt
    config = get_strategy("reinforce-ada").configure(CONFIG)
    assert config.normalize_std is False  # the script's A = r - p, no std
    completions, row_advantages = update_rows(rollouts, config)
    assert len(completions) == 16  # N_avg rows per prompt, whatever was sampled
    assert [c.prompt_token_ids[0] for c in completions] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert row_advantages[8:12].tolist() == [0.5, 0.5, -0.5, -0.5]  # p = 2 / 4
    assert row_advantages[:8].eq(0).all() and row_advantages[12:].eq(0).all()
    spent = step_compute(rollouts, completions, row_advantages, StepSeconds(1.0, 1.0, 0.0))
    assert spent["compute/rollouts"] == 52  # every generated rollout counts
    assert spent["compute/update_rows"] == 16
    status = record_status(
        empty_status(), 0, pool.ids[:4], rollouts.allocation, rollouts.batch, CONFIG
    )
    assert status["total_rollouts"].tolist() == [16, 16, 4, 16]


def test_reinforce_adas_balanced_group_takes_half_successes_and_fills_from_the_other_side():
    groups = np.array([0] * 10 + [1] * 5 + [2] * 6)
    won = np.array([1, 0, 1, 1, 1, 0, 0, 1, 0, 0] + [1, 0, 0, 0, 0] + [1] * 6, dtype=bool)
    rows = reinforce_ada.balanced_rows(groups, won, group_size=4)
    # Group 0: first 2 successes (rows 0, 2) and first 2 failures (rows 1, 5).
    assert np.flatnonzero(rows[:10]).tolist() == [0, 1, 2, 5]
    # Group 1: one success only, 3 failures fill; group 2: successes only, 4 of them.
    assert rows[10:15].tolist() == [True, True, True, True, False]
    assert rows[15:].tolist() == [True] * 4 + [False] * 2
    assert reinforce_ada.balanced(np.array([2, 1, 3]), np.array([4, 4, 4]), 4).tolist() == [
        True,
        False,
        False,
    ]
