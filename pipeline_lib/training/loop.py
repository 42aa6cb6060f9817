"""The Knapsack-GRPO training loop: allocate -> collect -> record status -> update -> sync.

One readable loop that holds no math: each part is a function in `steps.py`; the
engine, the updater, the tracker and the checkpointer come in through small
interfaces, so the same loop runs vLLM or HF, one process or an FSDP group,
MLflow or nothing, and resumes after a crash from the last checkpoint without
repeating a completed step's rollouts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import transformers
from tqdm.auto import tqdm

from pipeline_lib.config import TrainConfig
from pipeline_lib.prompts import PromptSet
from pipeline_lib.rollout.base import RolloutEngine, SamplingConfig
from pipeline_lib.tracking import Tracker
from pipeline_lib.training.state import Checkpointer, TrainState
from pipeline_lib.training.steps import (
    EpochDiagnostics,
    advantages,
    allocate,
    collect,
    heldout_accuracy,
    record_status,
    step_metrics,
    step_prompts,
)
from pipeline_lib.update.core import Updater, build_update_batch


@dataclass
class TrainingResult:
    """What a finished run reports."""

    steps: pd.DataFrame  # one row per step: step, epoch, metrics
    final_accuracy: float
    mean_effective_gradient_ratio: float
    rollout_tokens_per_second: float
    resumed_from_step: int = 0


@dataclass(frozen=True)
class TrainingRun:
    """What a run trains and how: the policy, its data, the settings."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    train_set: PromptSet
    heldout_set: PromptSet
    config: TrainConfig
    strategy: str
    seed: int


def train_policy(
    run: TrainingRun,
    state: TrainState,
    engine: RolloutEngine,
    updater: Updater,
    tracker: Tracker,
    checkpointer: Checkpointer,
    *,
    progress: bool = True,
) -> TrainingResult:
    """Train `run.model` from `state` up to `run.config.steps` steps.

    `state` is fresh or restored by `checkpointer` (which then also restored the
    model's weights); `updater` was opened on `run.model`. The engine is synced to
    the model's weights before the first step.
    """
    config, resumed_from = run.config, state.step
    if state.optimizer_state is not None:
        updater.load_optimizer_state_dict(state.optimizer_state)
    if state.rng_state is not None:
        torch.set_rng_state(state.rng_state)
    if resumed_from > 0:
        engine.update_weights(run.model.state_dict())
    run.model.eval()
    evaluate = _heldout_evaluator(run, engine)
    if state.step == 0:
        state.history.append({"step": 0, "epoch": 0, "eval/accuracy": evaluate()})
        tracker.log_metrics({"eval/accuracy": state.history[-1]["eval/accuracy"]}, step=0)
    diagnostics = EpochDiagnostics()
    bar = tqdm(
        total=config.steps,
        initial=state.step,
        desc=f"GRPO [{run.strategy}]",
        unit="step",
        disable=not progress,
    )
    with bar:
        while state.step < config.steps:
            started = time.perf_counter()
            record = _train_step(run, state, engine, updater, tracker, diagnostics, evaluate)
            last = state.step + 1 == config.steps
            if (state.step + 1) % config.checkpoint_every == 0 or last:
                _save(run, state, updater, checkpointer, record)
            _log(state, record, tracker, started)
            bar.update()
            bar.set_postfix(
                egr=f"{record['rollout/effective_gradient_ratio']:.2f}",
                acc=f"{history_accuracy(state.history):.3f}",
            )
    diagnostics.flush(tracker)
    return _result(state.history, resumed_from)


def _heldout_evaluator(run: TrainingRun, engine: RolloutEngine):
    """A no-argument function: held-out accuracy of the engine's current weights."""
    config = run.config
    sampling = SamplingConfig(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=run.seed
    )
    subset = run.heldout_set.head(config.eval_prompts)

    def evaluate() -> float:
        return heldout_accuracy(
            engine, subset, sampling, config.eval_samples, config.reward_extraction
        )

    return evaluate


def _train_step(
    run: TrainingRun,
    state: TrainState,
    engine: RolloutEngine,
    updater: Updater,
    tracker: Tracker,
    diagnostics: EpochDiagnostics,
    evaluate,
) -> dict[str, float]:
    """Step `state.step`: returns its metrics record and updates `state.status`."""
    config, step = run.config, state.step
    epoch, indices = step_prompts(len(run.train_set), step, config.prompts_per_step, run.seed)
    ids = [run.train_set.ids[i] for i in indices]
    allocation = allocate(state.status, ids, config, run.strategy)
    sampling = SamplingConfig(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=run.seed * 100_003 + step,
    )
    batch = collect(
        engine, run.train_set, indices, allocation.rollouts, sampling, config.reward_extraction
    )
    state.status = record_status(state.status, epoch, ids, allocation, batch, config)
    update_batch = build_update_batch(
        batch.completions, advantages(batch, config), run.tokenizer.pad_token_id
    )
    update_stats = updater.update(update_batch)
    sync_started = time.perf_counter()
    engine.update_weights(run.model.state_dict())
    metrics = step_metrics(allocation, batch, time.perf_counter() - sync_started)
    metrics |= update_stats
    diagnostics.add(epoch, allocation, batch, tracker)
    if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
        metrics["eval/accuracy"] = evaluate()
    return {"step": step + 1, "epoch": epoch} | metrics


def _save(
    run: TrainingRun,
    state: TrainState,
    updater: Updater,
    checkpointer: Checkpointer,
    record: dict[str, float],
) -> None:
    """Checkpoint the state as it will be after this step (its record included)."""
    finished = TrainState(
        step=state.step + 1,
        status=state.status,
        history=state.history + [record],
        optimizer_state=updater.optimizer_state_dict(),
        rng_state=torch.get_rng_state(),
    )
    checkpointer.save(finished, run.model, run.tokenizer)


def _log(state: TrainState, record: dict[str, float], tracker: Tracker, started: float) -> None:
    """Time the step, log its metrics, append it to the history, advance the step."""
    metrics = {k: v for k, v in record.items() if k not in ("step", "epoch")}
    metrics["time/step_seconds"] = time.perf_counter() - started
    tracking_started = time.perf_counter()
    tracker.log_metrics(metrics, step=int(record["step"]))
    metrics["time/tracking_seconds"] = time.perf_counter() - tracking_started
    state.history.append({"step": record["step"], "epoch": record["epoch"]} | metrics)
    state.step += 1


def history_accuracy(history: Sequence[dict[str, float]]) -> float:
    """The latest held-out accuracy in a metric history (NaN if none yet)."""
    for record in reversed(history):
        value = record.get("eval/accuracy")
        if value is not None and not pd.isna(value):
            return float(value)
    return float("nan")


def _result(history: list[dict[str, float]], resumed_from: int) -> TrainingResult:
    table = pd.DataFrame(history)
    trained = table[table["step"] > 0]
    return TrainingResult(
        steps=table,
        final_accuracy=history_accuracy(history),
        mean_effective_gradient_ratio=float(trained["rollout/effective_gradient_ratio"].mean()),
        rollout_tokens_per_second=float(
            trained["rollout/tokens"].sum() / max(trained["rollout/seconds"].sum(), 1e-9)
        ),
        resumed_from_step=resumed_from,
    )
