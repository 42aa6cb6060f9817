"""Prefect task of stage `evaluate`: avg@k and pass@k of one policy on one benchmark."""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from pipeline_lib.config import PipelineConfig
from pipeline_lib.data.schema import read_prompts
from pipeline_lib.evaluation import summarize_benchmark
from pipeline_lib.policy.tiny import load_policy
from pipeline_lib.prompts import encode_prompts
from pipeline_lib.rewards import grade_batch
from pipeline_lib.rollout.base import RolloutEngine, SamplingConfig


@task(cache_policy=(INPUTS + TASK_SOURCE) - "engine", persist_result=True)
def evaluate_policy(
    config: PipelineConfig,
    policy_dir: str,
    policy_hash: str,
    benchmark_path: str,
    benchmark_hash: str,
    engine: RolloutEngine,
) -> dict[str, float]:
    """Sample k completions per benchmark prompt with the policy's weights; score them.

    Returns accuracy (avg@k) with a 95 % interval, pass@k for each configured k,
    and accuracy per difficulty level where the benchmark has levels.
    """
    model, tokenizer = load_policy(policy_dir)
    engine.update_weights(model.state_dict())
    table = read_prompts(benchmark_path)
    token_ids = encode_prompts(
        tokenizer,
        table["problem"].tolist(),
        config.bootstrap.prompt_template,
        config.bootstrap.instruction,
    )
    k = config.evaluate.samples_per_prompt
    sampling = SamplingConfig(
        max_new_tokens=config.evaluate.max_new_tokens,
        temperature=config.evaluate.temperature,
        seed=config.seed,
    )
    groups = engine.generate(token_ids, [k] * len(token_ids), sampling)
    texts = [c.text for group in groups for c in group]
    answers = [a for a in table["answer"].tolist() for _ in range(k)]
    rewards = np.asarray(grade_batch(texts, answers, config.train.reward_extraction))
    correct = (rewards.reshape(len(token_ids), k) >= 0.5).sum(axis=1)
    metrics = summarize_benchmark(np.full(len(token_ids), k), correct, config.evaluate.pass_at)
    levels = table["level"].to_numpy()
    for level in sorted(set(levels.tolist()) - {-1}):
        metrics[f"accuracy_level_{level}"] = float(correct[levels == level].mean() / k)
    return metrics
