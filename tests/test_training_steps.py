"""The parts of a training step, one by one, on an in-memory engine with known rewards."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline_lib.config import TrainConfig
from pipeline_lib.prompts import PromptSet
from pipeline_lib.rollout.base import Completion, GenerationStats, SamplingConfig
from pipeline_lib.status import empty_status
from pipeline_lib.training.steps import (
    advantages,
    allocate,
    collect,
    heldout_accuracy,
    record_status,
    step_metrics,
)


class ScriptedEngine:
    """A rollout engine whose prompt i succeeds on its first `successes[i]` samples.

    Prompt i's token ids are [i]; a success answers with the reference, a failure with "x".
    """

    def __init__(self, answers: list[str], successes: list[int]):
        self.answers, self.successes, self.calls = answers, successes, []
        self.last_stats: GenerationStats | None = None

    def generate(self, prompt_token_ids, n_per_prompt, sampling):
        self.calls.append(list(n_per_prompt))
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
