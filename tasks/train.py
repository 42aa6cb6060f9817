"""Prefect task of stage `train`: one allocation strategy's Knapsack-GRPO run.

The task builds what the loop needs (policy, prompt sets, updater, checkpointer,
MLflow run) and hands it to `pipeline_lib.training.train_policy`. No Prefect result
cache: DVC decides when the stage reruns, and a rerun must really train.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.adapters.mlflow_runs import find_run_by_tag, prepare_tracking_store
from pipeline_lib.adapters.mlflow_tracker import start_run
from pipeline_lib.config import PipelineConfig, TrainConfig
from pipeline_lib.data.schema import read_prompts
from pipeline_lib.policy.checkpoint import load_policy, save_policy
from pipeline_lib.prompts import PromptSet, encode_prompts
from pipeline_lib.rollout.base import RolloutEngine
from pipeline_lib.tracking import Tracker
from pipeline_lib.training import (
    Checkpointer,
    DirectoryCheckpointer,
    TrainingResult,
    TrainingRun,
    TrainState,
    train_policy,
)
from pipeline_lib.training.compute import is_wall_clock
from pipeline_lib.training.loop import HeldoutEvaluator
from pipeline_lib.training.steps import check_step_fits_pool
from pipeline_lib.update import LocalUpdater, Updater, UpdateSettings

STATE_ROOT = Path("outputs/train_state")
TRAIN_KEY_TAG = "knapsack_rl.train_key"


def check_training_pool(config: PipelineConfig, train_path: str | Path) -> None:
    """Fail before any compute (engine start, model load) when a step cannot fit the pool."""
    check_step_fits_pool(len(read_prompts(train_path)), config.train.prompts_per_step)


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


def open_updater(
    model: transformers.PreTrainedModel, config: TrainConfig, reference_dir: str | None = None
) -> Updater:
    """In this process for `update_processes: 1`, else a worker group (FSDP on GPUs).

    With `kl_coef` > 0 the policy in `reference_dir` (the start policy) is loaded,
    frozen, as the KL reference. The group is imported only when asked for: it
    starts processes and needs accelerate.
    """
    settings = UpdateSettings.from_train_config(config)
    reference = None
    if config.kl_coef > 0:
        if reference_dir is None:
            raise ValueError("train.kl_coef > 0 needs the reference (start) policy")
        reference, _ = load_policy(reference_dir, dtype=model.dtype)
        reference.to(model.device).eval().requires_grad_(False)
    if config.update_processes == 1:
        return LocalUpdater(
            model, learning_rate=config.learning_rate, settings=settings, reference=reference
        )
    from pipeline_lib.update.distributed import AccelerateUpdateGroup

    return AccelerateUpdateGroup(
        model,
        num_processes=config.update_processes,
        learning_rate=config.learning_rate,
        settings=settings,
        reference=reference,
    )


def _strategy_run(
    config: PipelineConfig, stage_tracker: Tracker, strategy: str, key: str, resuming: bool
) -> AbstractContextManager[Tracker]:
    """Continue the MLflow run of an interrupted attempt (found by its key tag), or open one."""
    previous = find_run_by_tag(config, TRAIN_KEY_TAG, key) if resuming else None
    if previous is not None:
        return start_run(
            prepare_tracking_store(config), config.tracking.experiment, run_id=previous
        )
    tags = {"strategy": strategy, "stage": "train", TRAIN_KEY_TAG: key}
    return stage_tracker.child(f"train/{strategy}", tags=tags)


@task(cache_policy=NO_CACHE, task_run_name="train-{strategy}")  # the run says which
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

    An interrupted run with the same configuration, start policy and data resumes
    from its last checkpoint.
    """
    key = f"{config.fingerprint()}-{strategy}-{start_hash}-{data_hash}"
    output_dir = Path(config.train.output_dir) / strategy
    outcome = run_training(
        config,
        strategy,
        TrainingInputs(start_policy, train_path, heldout_path),
        engine,
        DirectoryCheckpointer(STATE_ROOT / strategy, fingerprint=key),
        lambda resuming: _strategy_run(config, stage_tracker, strategy, key, resuming),
        output_dir,
    )
    return outcome.summary | {
        "policy_dir": str(output_dir),
        "steps_csv": str(output_dir / "steps.csv"),
    }


@dataclass(frozen=True)
class TrainingInputs:
    """Where a run's start policy and prompt tables are."""

    start_policy: str
    train_path: str
    heldout_path: str


@dataclass(frozen=True)
class TrainingOutcome:
    """A finished run: the loop's result, its summary, the final per-prompt scores."""

    result: TrainingResult
    summary: dict[str, float]
    prompt_scores: np.ndarray
    """float[eval_prompts] mean reward per held-out prompt at the end of training."""
    run_id: str | None


def run_training(
    config: PipelineConfig,
    strategy: str,
    inputs: TrainingInputs,
    engine: RolloutEngine,
    checkpointer: Checkpointer,
    open_run: Callable[[bool], AbstractContextManager[Tracker]],
    output_dir: Path,
    save_policy_dir: bool = True,
) -> TrainingOutcome:
    """The code path of every training run (stage `train`, each run of `compare`).

    `open_run(resuming)` opens the run's MLflow run; `checkpointer` holds its resumable
    state. Writes steps.csv and train_summary.json (and the policy, unless told not
    to) into `output_dir`.
    """
    check_training_pool(config, inputs.train_path)
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    model, tokenizer = load_policy(inputs.start_policy)
    if torch.cuda.is_available() and config.train.update_processes == 1:
        model.to("cuda")  # the update runs in this process: on the GPU (a group places its own)
    engine.update_weights(model.state_dict())  # the engine may hold another run's weights
    state = checkpointer.restore(model) or TrainState()
    run = TrainingRun(
        model=model,
        tokenizer=tokenizer,
        train_set=prompt_set(inputs.train_path, tokenizer, config),
        heldout_set=prompt_set(inputs.heldout_path, tokenizer, config),
        config=config.train,
        strategy=strategy,
        seed=config.seed,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    with (
        open_run(state.step > 0) as tracker,
        # Opened after the restore: a worker group copies the model's weights when it starts.
        contextlib.closing(open_updater(model, config.train, inputs.start_policy)) as updater,
    ):
        tracker.log_params({"strategy": strategy})
        result = train_policy(run, state, engine, updater, tracker, checkpointer)
        scores = result.final_prompt_scores
        if scores is None:  # the run was complete before this call: evaluate it again
            evaluate = HeldoutEvaluator(run, engine)
            evaluate()
            scores = evaluate.last_scores
        if save_policy_dir:
            save_policy(model, tokenizer, output_dir)
            tracker.log_model(output_dir, "policy")
        summary = _write_outputs(result, output_dir, tracker)
    return TrainingOutcome(result, summary, np.asarray(scores), tracker.run_id)


def _write_outputs(result: TrainingResult, output_dir: Path, tracker: Tracker) -> dict[str, float]:
    """steps.csv and train_summary.json beside the policy; all of it to MLflow.

    The files beside the policy leave out wall-clock numbers, so that a rerun's
    models/trained is bit-identical (docs/operations.md, Reproducibility); MLflow gets the whole
    table, timings included, and the returned summary has the timings for
    metrics/timing.json.
    """
    summary = {
        "final_accuracy": result.final_accuracy,
        "mean_effective_gradient_ratio": result.mean_effective_gradient_ratio,
        "rollout_tokens_per_second": result.rollout_tokens_per_second,
        "resumed_from_step": float(result.resumed_from_step),
        "mean_step_seconds": float(result.steps["time/step_seconds"].mean()),
        "mean_tracking_seconds": float(result.steps["time/tracking_seconds"].mean()),
    }
    tracker.log_metrics({f"summary/{k}": v for k, v in summary.items()})
    with tempfile.TemporaryDirectory() as scratch:
        timed_csv = Path(scratch) / "steps.csv"
        result.steps.to_csv(timed_csv, index=False)
        tracker.log_artifact(str(timed_csv), "metrics")
    steps = result.steps.drop(columns=[c for c in result.steps if is_wall_clock(c)])
    steps.to_csv(output_dir / "steps.csv", index=False)
    untimed = {k: v for k, v in summary.items() if not is_wall_clock(k)}
    (output_dir / "train_summary.json").write_text(json.dumps(untimed, indent=2))
    return summary
