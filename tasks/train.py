"""Prefect task of stage `train`: one allocation strategy's Knapsack-GRPO run."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from pipeline_lib.config import PipelineConfig
from pipeline_lib.data.schema import read_prompts
from pipeline_lib.policy.tiny import load_policy, save_policy
from pipeline_lib.prompts import encode_prompts
from pipeline_lib.rollout.base import RolloutEngine
from pipeline_lib.tracking import Tracker, start_run
from pipeline_lib.training import PromptSet, read_checkpoint_meta, train_policy
from tasks.tracking import tracking_uri

STATE_ROOT = Path("outputs/train_state")


def prompt_set(path: str, tokenizer, config: PipelineConfig) -> PromptSet:
    """A prompt table encoded for the policy's tokenizer and template."""
    table = read_prompts(path)
    token_ids = encode_prompts(
        tokenizer,
        table["problem"].tolist(),
        config.bootstrap.prompt_template,
        config.bootstrap.instruction,
    )
    return PromptSet(table["id"].tolist(), token_ids, table["answer"].tolist())


def _strategy_run(
    config: PipelineConfig, stage_tracker: Tracker, strategy: str, state_dir: Path, key: str
) -> AbstractContextManager[Tracker]:
    """Continue the MLflow run of an interrupted attempt, or open a new nested one."""
    meta = read_checkpoint_meta(state_dir)
    if meta and meta["fingerprint"] == key and meta.get("mlflow_run_id"):
        return start_run(
            tracking_uri(config), config.tracking.experiment, run_id=meta["mlflow_run_id"]
        )
    return stage_tracker.child(f"train/{strategy}", tags={"strategy": strategy, "stage": "train"})


@task(
    cache_policy=(INPUTS + TASK_SOURCE) - "engine" - "stage_tracker",
    persist_result=True,
)
def train_strategy(
    config: PipelineConfig,
    strategy: str,
    start_policy: str,
    start_hash: str,
    train_path: str,
    heldout_path: str,
    data_hash: str,
    engine: RolloutEngine,
    stage_tracker: Tracker,
) -> dict[str, float | str]:
    """Train from the starting policy with one strategy; return its summary and output paths.

    Cached on the configuration, strategy and content hashes of the starting
    policy and data; an interrupted run resumes from its last checkpoint.
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    model, tokenizer = load_policy(start_policy)
    if torch.cuda.is_available() and config.train.update_processes == 1:
        model.to("cuda")  # the update runs in this process: on the GPU (a group places its own)
    engine.update_weights(model.state_dict())  # the engine may hold another run's weights
    state_dir = STATE_ROOT / strategy
    key = f"{config.fingerprint()}-{strategy}-{start_hash}-{data_hash}"
    output_dir = Path(config.train.output_dir) / strategy
    with _strategy_run(config, stage_tracker, strategy, state_dir, key) as tracker:
        tracker.log_params({"strategy": strategy})
        result = train_policy(
            model=model,
            tokenizer=tokenizer,
            engine=engine,
            train_set=prompt_set(train_path, tokenizer, config),
            heldout_set=prompt_set(heldout_path, tokenizer, config),
            config=config.train,
            strategy=strategy,
            seed=config.seed,
            state_dir=state_dir,
            fingerprint=key,
            tracker=tracker,
        )
        save_policy(model, tokenizer, output_dir)
        steps_csv = output_dir / "steps.csv"
        result.steps.to_csv(steps_csv, index=False)
        summary = {
            "final_accuracy": result.final_accuracy,
            "mean_effective_gradient_ratio": result.mean_effective_gradient_ratio,
            "rollout_tokens_per_second": result.rollout_tokens_per_second,
            "resumed_from_step": float(result.resumed_from_step),
            "mean_step_seconds": float(result.steps["time/step_seconds"].mean()),
            "mean_tracking_seconds": float(result.steps["time/tracking_seconds"].mean()),
        }
        tracker.log_metrics({f"summary/{k}": v for k, v in summary.items()})
        tracker.log_artifact(str(steps_csv), "metrics")
        tracker.log_artifact(str(output_dir), "policy")
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary | {"policy_dir": str(output_dir), "steps_csv": str(steps_csv)}
