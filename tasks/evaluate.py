"""Prefect task of stage `evaluate`: avg@k and pass@k of one policy on one benchmark."""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.config import PipelineConfig
from pipeline_lib.data.schema import read_prompts
from pipeline_lib.evaluation import summarize_benchmark
from pipeline_lib.policy.checkpoint import load_policy
from pipeline_lib.prompts import PromptSet, encode_prompts
from pipeline_lib.rollout.base import RolloutEngine, SamplingConfig
from pipeline_lib.scoring import sample_rewards


# No Prefect result cache: DVC decides when evaluation reruns, and a rerun must re-score.
@task(cache_policy=NO_CACHE)
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
    prompts = PromptSet(table["id"].tolist(), token_ids, table["answer"].tolist())
    rewards = sample_rewards(engine, prompts, sampling, k, config.train.reward_extraction)
    correct = (rewards >= 0.5).sum(axis=1)
    metrics = summarize_benchmark(np.full(len(token_ids), k), correct, config.evaluate.pass_at)
    levels = table["level"].to_numpy()
    for level in sorted(set(levels.tolist()) - {-1}):
        metrics[f"accuracy_level_{level}"] = float(correct[levels == level].mean() / k)
    return metrics
