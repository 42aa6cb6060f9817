"""Prefect task of stage `evaluate`: avg@k and pass@k of one policy on one benchmark."""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.adapters.mlflow_runs import (
    NOTE_TAG,
    append_to_run,
    pipeline_description,
    pipeline_parent,
    stage_links,
    strategy_runs,
)
from pipeline_lib.config import PipelineConfig
from pipeline_lib.data.schema import read_prompts
from pipeline_lib.evaluation.headline import markdown_table
from pipeline_lib.evaluation.metrics import summarize_benchmark
from pipeline_lib.evaluation.summary import SUMMARY, mlflow_name
from pipeline_lib.policy.checkpoint import load_policy
from pipeline_lib.prompts import PromptSet, encode_prompts
from pipeline_lib.rewards.sampling import sample_rewards
from pipeline_lib.rollout.base import RolloutEngine, SamplingConfig


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


def log_pipeline_result(
    config: PipelineConfig, summary: dict[str, float], results: dict, benchmark: str
) -> None:
    """The answer into MLflow: the parent run (headline, summary.json, description with the
    table and stage links) and each strategy's training run (config, held-out results)."""
    parent = pipeline_parent(config)
    if parent is None:
        return
    strategies = config.train.strategies
    for strategy, run_id in strategy_runs(config, parent).items():
        if strategy not in results:
            continue
        run = append_to_run(config, run_id)
        run.log_params({"train": config.train.model_dump(mode="json"), "seed": config.seed})
        run.log_metrics(
            {
                mlflow_name(f"heldout/{bench}/{key}"): value
                for bench, metrics in results[strategy].items()
                for key, value in metrics.items()
            }
        )
        run.set_tags({"benchmark": benchmark})
    run = append_to_run(config, parent)
    run.log_metrics(summary)
    run.log_artifact(str(SUMMARY), "metrics")
    table = f"Held-out results on `{benchmark}`:\n\n" + markdown_table(summary, strategies)
    results_text = table + "\n\n" + stage_links(config, parent)
    run.set_tags({NOTE_TAG: pipeline_description(config, results_text), "benchmark": benchmark})
