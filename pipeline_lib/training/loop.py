"""The Knapsack-GRPO training loop: sample (allocate + collect) -> record status -> update -> sync.

One readable loop that holds no math: each part is a function in `steps.py`; the
engine, the updater, the tracker and the checkpointer come in through small
interfaces, so the same loop runs vLLM or HF, one process or an FSDP group,
MLflow or nothing, and resumes after a crash from the last checkpoint without
repeating a completed step's rollouts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import transformers
from tqdm.auto import tqdm

from pipeline_lib.allocation.strategies import get_strategy
from pipeline_lib.config import TrainConfig
from pipeline_lib.prompts import PromptSet
from pipeline_lib.rollout.base import Completion, RolloutEngine, SamplingConfig
from pipeline_lib.tracking import Tracker
from pipeline_lib.training.compute import StepSeconds, accumulate, step_compute
from pipeline_lib.training.state import Checkpointer, TrainState
from pipeline_lib.training.steps import (
    EpochDiagnostics,
    StepRollouts,
    heldout_prompt_scores,
    record_status,
    refill_prompts,
    sample_step,
    step_metrics,
    step_prompts,
    strategy_state,
    update_rows,
    zero_variance_shares,
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
    compute_totals: dict[str, float] = field(default_factory=dict)
    """The last step's `compute/<name>_total` (training.compute): what the run spent."""
    final_prompt_scores: np.ndarray | None = None
    """float[eval_prompts]: each held-out prompt's mean reward at the final evaluation;
    None when this call ran no step (the run was already complete)."""


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
    evaluate = HeldoutEvaluator(run, engine)
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
            diagnostics.log_finished(tracker)  # after the step's clock: plots take a second
            bar.update()
            bar.set_postfix(
                egr=f"{record['rollout/effective_gradient_ratio']:.2f}",
                acc=f"{history_accuracy(state.history):.3f}",
            )
    diagnostics.flush(tracker)
    final_scores = evaluate.last_scores if state.step > resumed_from else None
    return _result(state.history, resumed_from, final_scores)


class HeldoutEvaluator:
    """Held-out accuracy of the engine's current weights; keeps the last per-prompt scores."""

    def __init__(self, run: TrainingRun, engine: RolloutEngine) -> None:
        config = run.config
        self.engine, self.config = engine, config
        self.sampling = SamplingConfig(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=run.seed
        )
        self.prompts = run.heldout_set.head(config.eval_prompts)
        self.last_scores: np.ndarray | None = None

    def __call__(self) -> float:
        self.last_scores = heldout_prompt_scores(
            self.engine,
            self.prompts,
            self.sampling,
            self.config.eval_samples,
            self.config.reward_extraction,
        )
        return float(self.last_scores.mean())


def _train_step(
    run: TrainingRun,
    state: TrainState,
    engine: RolloutEngine,
    updater: Updater,
    tracker: Tracker,
    diagnostics: EpochDiagnostics,
    evaluate: HeldoutEvaluator,
) -> dict[str, float]:
    """Step `state.step`: returns its metrics record and updates `state.status`."""
    config, step, pool = run.config, state.step, len(run.train_set)
    epoch, indices = step_prompts(pool, step, config.prompts_per_step, run.seed)
    sampling = SamplingConfig(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=run.seed * 100_003 + step,
    )
    started = time.perf_counter()
    carried = strategy_state(state.history, run.strategy)
    rollouts = sample_step(
        engine,
        run.train_set,
        state.status,
        indices,
        refill_prompts(pool, step, run.seed, indices),
        run.strategy,
        config,
        sampling,
        carried,
    )
    rollout_seconds = time.perf_counter() - started
    # The step's own (rolled-out) prompts come first.
    ids = [run.train_set.ids[i] for i in rollouts.own_indices]
    state.status = record_status(
        state.status, epoch, ids, rollouts.allocation, rollouts.batch, config
    )
    started = time.perf_counter()
    completions, row_advantages = update_rows(rollouts, config)
    update_stats = _update(
        updater, completions, row_advantages, run.tokenizer.pad_token_id, run.seed * 100_003 + step
    )
    update_seconds = time.perf_counter() - started
    started = time.perf_counter()
    engine.update_weights(run.model.state_dict())
    sync_seconds = time.perf_counter() - started
    metrics = step_metrics(rollouts.allocation, rollouts.batch, sync_seconds) | update_stats
    spent = step_compute(
        rollouts,
        completions,
        row_advantages,
        StepSeconds(rollout_seconds, update_seconds, sync_seconds),
    )
    metrics |= spent | accumulate(state.history[-1] if state.history else {}, spent)
    metrics |= _strategy_metrics(run.strategy, carried, epoch, rollouts)
    diagnostics.add(epoch, rollouts.allocation, rollouts.batch)
    if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
        metrics["eval/accuracy"] = evaluate()
    return {"step": step + 1, "epoch": epoch} | metrics


def _strategy_metrics(
    strategy: str, carried: dict[str, float], epoch: int, rollouts: StepRollouts
) -> dict[str, float]:
    """A skipping strategy's prompts skipped this step, a stateful one's state after it (as
    `strategy/<key>`, which the next step reads back); nothing for the others."""
    chosen = get_strategy(strategy)
    metrics = {"rollout/skipped_prompts": float(rollouts.skipped)} if chosen.skips else {}
    if chosen.adapt is not None:
        moved = chosen.adapt(carried, epoch, *zero_variance_shares(rollouts.batch))
        metrics |= {f"strategy/{key}": value for key, value in moved.items()}
    return metrics


def _update(
    updater: Updater,
    completions: list[Completion],
    advantages: torch.Tensor,
    pad_token_id: int,
    shuffle_seed: int,
) -> dict[str, float]:
    """One GRPO update on the given rows; none when there are no rows (dynamic sampling
    found no group with mixed rewards). `shuffle_seed` orders the PPO mini-batches' rows."""
    if not completions:
        return {"train/optimizer_steps": 0.0}
    return updater.update(build_update_batch(completions, advantages, pad_token_id, shuffle_seed))


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


def _result(
    history: list[dict[str, float]], resumed_from: int, final_scores: np.ndarray | None
) -> TrainingResult:
    table = pd.DataFrame(history)
    trained = table[table["step"] > 0]
    last = history[-1]
    return TrainingResult(
        steps=table,
        final_accuracy=history_accuracy(history),
        mean_effective_gradient_ratio=float(trained["rollout/effective_gradient_ratio"].mean()),
        rollout_tokens_per_second=float(
            trained["rollout/tokens"].sum() / max(trained["rollout/seconds"].sum(), 1e-9)
        ),
        resumed_from_step=resumed_from,
        compute_totals={
            k: float(v)
            for k, v in last.items()
            if k.startswith("compute/") and k.endswith("_total")
        },
        final_prompt_scores=final_scores,
    )
