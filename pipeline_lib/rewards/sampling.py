"""Sample and grade: how a policy's accuracy is measured, the same way in every stage."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline_lib.prompts import PromptSet
from pipeline_lib.rewards.grading import grade_batch
from pipeline_lib.rollout.base import Completion, RolloutEngine, SamplingConfig


def grade(completions: Sequence[Completion], answers: Sequence[str], extraction: str) -> np.ndarray:
    """Rewards float[len(completions)] for completions paired with their reference answers."""
    return np.asarray(grade_batch([c.text for c in completions], list(answers), extraction))


def sample_rewards(
    engine: RolloutEngine,
    prompts: PromptSet,
    sampling: SamplingConfig,
    samples_per_prompt: int,
    extraction: str,
) -> np.ndarray:
    """Rewards float[M, samples_per_prompt]: each prompt sampled and graded k times."""
    groups = engine.generate(prompts.token_ids, [samples_per_prompt] * len(prompts), sampling)
    flat = [c for group in groups for c in group]
    rewards = grade(flat, [prompts.answers[c.prompt_index] for c in flat], extraction)
    return rewards.reshape(len(prompts), samples_per_prompt)
