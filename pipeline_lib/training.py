"""The Knapsack-GRPO training loop: status -> allocation -> rollout -> reward -> update -> sync.

One readable loop that holds no math: allocation, status, rewards and GRPO live in
their own modules; the engine and the tracker come in through small interfaces.
A resumable checkpoint (policy, optimiser, prompt status, metric history) is
written every `checkpoint_every` steps, so a crashed run continues from the last
completed step without repeating its rollouts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers
from tqdm.auto import tqdm

from pipeline_lib.allocation import allocate_rollouts
from pipeline_lib.config import TrainConfig
from pipeline_lib.grpo import effective_gradient_ratio, group_advantages
from pipeline_lib.plots import allocation_histogram, calibration_plot
from pipeline_lib.rewards import grade_batch
from pipeline_lib.rollout.base import Completion, RolloutEngine, SamplingConfig
from pipeline_lib.status import (
    empty_status,
    estimate_success_rates,
    load_status,
    record_visit,
    save_status,
)
from pipeline_lib.tracking import Tracker
from pipeline_lib.update import Updater, UpdateSettings, build_update_batch, open_updater

CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class PromptSet:
    """Prompts ready for the engine: ids, token ids and reference answers, aligned."""

    ids: list[str]
    token_ids: list[list[int]]
    answers: list[str]

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.token_ids) == len(self.answers)):
            raise ValueError("ids, token_ids and answers must have the same length")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TrainingResult:
    """What a finished run reports."""

    steps: pd.DataFrame  # one row per step: step, epoch, metrics
    final_accuracy: float
    mean_effective_gradient_ratio: float
    rollout_tokens_per_second: float
    resumed_from_step: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def step_prompts(
    num_prompts: int, step: int, prompts_per_step: int, seed: int
) -> tuple[int, np.ndarray]:
    """(epoch, prompt indices) of a step: each epoch visits the pool once in a seeded order."""
    steps_per_epoch = max(num_prompts // prompts_per_step, 1)
    epoch, offset = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
    start = offset * prompts_per_step
    return epoch, order[start : start + prompts_per_step]


def grade(completions: Sequence[Completion], answers: Sequence[str], extraction: str) -> np.ndarray:
    """Rewards float[len(completions)] for completions paired with their reference answers."""
    return np.asarray(grade_batch([c.text for c in completions], list(answers), extraction))


def heldout_accuracy(
    engine: RolloutEngine,
    heldout: PromptSet,
    sampling: SamplingConfig,
    samples_per_prompt: int,
    extraction: str,
) -> float:
    """Mean reward over `samples_per_prompt` samples of every held-out prompt."""
    groups = engine.generate(heldout.token_ids, [samples_per_prompt] * len(heldout), sampling)
    flat = [c for group in groups for c in group]
    answers = [heldout.answers[c.prompt_index] for c in flat]
    return float(grade(flat, answers, extraction).mean())


def _save_checkpoint(
    state_dir: Path,
    *,
    step: int,
    fingerprint: str,
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    updater: Updater,
    status: pd.DataFrame,
    history: list[dict[str, float]],
    run_id: str | None,
) -> None:
    """Write the resumable state to a staging folder, then swap it in (never half-written)."""
    target = state_dir / CHECKPOINT_DIR
    staging = state_dir / f".{CHECKPOINT_DIR}.tmp-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    with _without_transformers_progress_bars():  # one bar a step would bury the loop's
        model.save_pretrained(staging / "policy")
    tokenizer.save_pretrained(staging / "policy")
    torch.save(updater.optimizer_state_dict(), staging / "optimizer.pt")
    save_status(status, staging / "status.parquet")
    pd.DataFrame(history).to_csv(staging / "history.csv", index=False)
    meta = {"step": step, "fingerprint": fingerprint, "mlflow_run_id": run_id}
    (staging / "meta.json").write_text(json.dumps(meta))
    if target.exists():
        retired = state_dir / f".{CHECKPOINT_DIR}.old-{uuid.uuid4().hex}"
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired)
    else:
        os.replace(staging, target)


@contextlib.contextmanager
def _without_transformers_progress_bars() -> Iterator[None]:
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def read_checkpoint_meta(state_dir: Path) -> dict | None:
    """The saved step, config fingerprint and MLflow run id, or None if there is no checkpoint."""
    meta = state_dir / CHECKPOINT_DIR / "meta.json"
    return json.loads(meta.read_text()) if meta.exists() else None


def train_policy(
    *,
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    engine: RolloutEngine,
    train_set: PromptSet,
    heldout_set: PromptSet,
    config: TrainConfig,
    strategy: str,
    seed: int,
    state_dir: Path,
    fingerprint: str,
    tracker: Tracker,
    progress: bool = True,
) -> TrainingResult:
    """Train `model` with GRPO for `config.steps` steps; `engine` must hold the same weights.

    Resumes from `state_dir` when it holds a checkpoint with the same `fingerprint`.
    """
    status = empty_status()
    history: list[dict[str, float]] = []
    first_step = 0
    optimizer_state = None
    meta = read_checkpoint_meta(state_dir)
    if meta is not None and meta["fingerprint"] == fingerprint:
        saved = state_dir / CHECKPOINT_DIR
        restored = type(model).from_pretrained(saved / "policy", dtype=model.dtype)
        model.load_state_dict(restored.state_dict())
        optimizer_state = torch.load(saved / "optimizer.pt")
        status = load_status(saved / "status.parquet")
        history = pd.read_csv(saved / "history.csv").to_dict("records")
        first_step = int(meta["step"]) + 1
        engine.update_weights(model.state_dict())
    model.eval()

    budget = config.prompts_per_step * config.rollouts_per_prompt
    settings = UpdateSettings(
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        aggregation=config.loss_aggregation,
        kl_coef=config.kl_coef,
    )
    # Opened after the restore: a worker group copies the model's weights when it starts.
    updater = open_updater(
        model,
        processes=config.update_processes,
        learning_rate=config.learning_rate,
        settings=settings,
    )
    with contextlib.closing(updater):
        if optimizer_state is not None:
            updater.load_optimizer_state_dict(optimizer_state)
        eval_sampling = SamplingConfig(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=seed
        )
        eval_subset = PromptSet(
            heldout_set.ids[: config.eval_prompts],
            heldout_set.token_ids[: config.eval_prompts],
            heldout_set.answers[: config.eval_prompts],
        )
        epoch_predicted: list[np.ndarray] = []
        epoch_realised: list[np.ndarray] = []
        epoch_rollouts: list[np.ndarray] = []
        current_epoch = None

        def evaluate_now() -> float:
            return heldout_accuracy(
                engine, eval_subset, eval_sampling, config.eval_samples, config.reward_extraction
            )

        if first_step == 0:
            history.append({"step": 0, "epoch": 0, "eval/accuracy": evaluate_now()})
            tracker.log_metrics({"eval/accuracy": history[-1]["eval/accuracy"]}, step=0)

        bar = tqdm(
            range(first_step, config.steps),
            desc=f"GRPO [{strategy}]",
            unit="step",
            disable=not progress,
            initial=first_step,
            total=config.steps,
        )
        for step in bar:
            step_started = time.perf_counter()
            epoch, indices = step_prompts(len(train_set), step, config.prompts_per_step, seed)
            if current_epoch is not None and epoch != current_epoch and epoch_rollouts:
                _log_epoch_plots(
                    tracker, current_epoch, epoch_predicted, epoch_realised, epoch_rollouts
                )
                epoch_predicted, epoch_realised, epoch_rollouts = [], [], []
            current_epoch = epoch
            ids = [train_set.ids[i] for i in indices]

            # 1. status -> allocation
            alloc_started = time.perf_counter()
            predicted = estimate_success_rates(status, ids, method=config.status_estimator)
            allocation = allocate_rollouts(
                predicted,
                budget,
                strategy=strategy,  # type: ignore[arg-type]
                min_rollouts=config.min_rollouts,
                max_rollouts=config.max_rollouts,
                unseen_rollouts=config.rollouts_per_prompt,
                fallback_confidence=config.fallback_confidence,
            )
            alloc_seconds = time.perf_counter() - alloc_started

            # 2. rollout with a different n per prompt
            sampling = SamplingConfig(
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                seed=seed * 100_003 + step,
            )
            groups = engine.generate(
                [train_set.token_ids[i] for i in indices], allocation.rollouts.tolist(), sampling
            )
            rollout_stats = engine.last_stats
            flat = [c for group in groups for c in group]
            group_ids = torch.tensor([c.prompt_index for c in flat], dtype=torch.long)

            # 3. rewards, status, advantages
            rewards = grade(
                flat,
                [train_set.answers[indices[c.prompt_index]] for c in flat],
                config.reward_extraction,
            )
            reward_tensor = torch.tensor(rewards, dtype=torch.float32)
            successes = np.bincount(group_ids.numpy(), weights=rewards >= 0.5, minlength=len(ids))
            status = record_visit(
                status, epoch, ids, allocation.rollouts, successes.astype(np.int64)
            )
            advantages = group_advantages(
                reward_tensor,
                group_ids,
                normalize_std=config.normalize_std,
                clip=config.advantage_clip,
            )

            # 4. GRPO update, then sync the engine
            batch = build_update_batch(flat, advantages, tokenizer.pad_token_id)
            update_stats = updater.update(batch)
            sync_started = time.perf_counter()
            engine.update_weights(model.state_dict())
            sync_seconds = time.perf_counter() - sync_started

            seen = ~np.isnan(predicted)
            epoch_predicted.append(predicted[seen])
            epoch_realised.append(successes[seen] / allocation.rollouts[seen])
            epoch_rollouts.append(allocation.rollouts)
            zero_value = (predicted == 0) | (predicted == 1)
            metrics = {
                "alloc/mean_rollouts": float(allocation.rollouts.mean()),
                "alloc/max_rollouts": float(allocation.rollouts.max()),
                "alloc/zero_value_prompts": float(zero_value.sum()),
                "alloc/unseen_prompts": float((~seen).sum()),
                "alloc/fallback_rollouts": float(allocation.fallback_rollouts),
                "alloc/seconds": alloc_seconds,
                "rollout/success_rate": float(rewards.mean()),
                "rollout/effective_gradient_ratio": effective_gradient_ratio(
                    reward_tensor, group_ids
                ),
                "rollout/tokens": float(rollout_stats.num_generated_tokens if rollout_stats else 0),
                "rollout/tokens_per_s": float(
                    rollout_stats.tokens_per_second if rollout_stats else 0
                ),
                "rollout/seconds": float(rollout_stats.seconds if rollout_stats else 0),
                "sync/seconds": sync_seconds,
            } | update_stats
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                metrics["eval/accuracy"] = evaluate_now()

            record = {"step": step + 1, "epoch": epoch} | metrics
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                _save_checkpoint(
                    state_dir,
                    step=step,
                    fingerprint=fingerprint,
                    model=model,
                    tokenizer=tokenizer,
                    updater=updater,
                    status=status,
                    history=history + [record],
                    run_id=tracker.run_id,
                )
            metrics["time/step_seconds"] = time.perf_counter() - step_started
            tracking_started = time.perf_counter()
            tracker.log_metrics(metrics, step=step + 1)
            metrics["time/tracking_seconds"] = time.perf_counter() - tracking_started
            history.append({"step": step + 1, "epoch": epoch} | metrics)
            bar.set_postfix(
                egr=f"{metrics['rollout/effective_gradient_ratio']:.2f}",
                acc=f"{history_accuracy(history):.3f}",
            )
        bar.close()
        if epoch_rollouts and current_epoch is not None:
            _log_epoch_plots(
                tracker, current_epoch, epoch_predicted, epoch_realised, epoch_rollouts
            )

        steps = pd.DataFrame(history)
        trained = steps[steps["step"] > 0]
        return TrainingResult(
            steps=steps,
            final_accuracy=history_accuracy(history),
            mean_effective_gradient_ratio=float(trained["rollout/effective_gradient_ratio"].mean()),
            rollout_tokens_per_second=float(
                trained["rollout/tokens"].sum() / max(trained["rollout/seconds"].sum(), 1e-9)
            ),
            resumed_from_step=first_step,
        )


def history_accuracy(history: Sequence[dict[str, float]]) -> float:
    """The latest held-out accuracy in a metric history (NaN if none yet)."""
    for record in reversed(history):
        value = record.get("eval/accuracy")
        if value is not None and not pd.isna(value):
            return float(value)
    return float("nan")


def _log_epoch_plots(
    tracker: Tracker,
    epoch: int,
    predicted: list[np.ndarray],
    realised: list[np.ndarray],
    rollouts: list[np.ndarray],
) -> None:
    """Allocation histogram and p-calibration (predicted vs realised success) of one epoch."""
    all_rollouts = np.concatenate(rollouts)
    tracker.log_figure(
        allocation_histogram(all_rollouts, title=f"Rollouts per prompt, epoch {epoch}"),
        f"plots/allocation/epoch_{epoch:03d}.png",
    )
    seen_predicted = np.concatenate(predicted)
    if seen_predicted.size:
        tracker.log_figure(
            calibration_plot(
                seen_predicted, np.concatenate(realised), title=f"Calibration, epoch {epoch}"
            ),
            f"plots/calibration/epoch_{epoch:03d}.png",
        )
