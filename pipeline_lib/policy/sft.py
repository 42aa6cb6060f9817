"""Supervised warm-up of a policy on (problem, answer) pairs.

The warm-up gives the embedded tiny model success rates spread across (0, 1)
over difficulty levels, which is where GRPO (and Knapsack allocation) have
something to work with; it is deliberately short so RL has room to improve.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from pipeline_lib.config import SFTParams

IGNORE_INDEX = -100  # label value that Hugging Face losses skip


def build_sft_batch(
    tokenizer: transformers.PreTrainedTokenizerBase,
    problems: Sequence[str],
    answers: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Tokenize `problem + answer + EOS`, right-padded, with loss only on answer and EOS.

    Returns input_ids, attention_mask, labels, each (batch, max_length); labels equal
    input_ids on answer and EOS tokens and `IGNORE_INDEX` on prompt and padding
    (unshifted: the model shifts them, as Hugging Face causal LMs do).
    """
    rows: list[tuple[list[int], list[int]]] = []
    for problem, answer in zip(problems, answers, strict=True):
        prompt_ids = tokenizer(problem, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids, [*answer_ids, tokenizer.eos_token_id]))
    max_length = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), max_length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), max_length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), max_length), dtype=torch.long)
    for row, (prompt_ids, answer_ids) in enumerate(rows):
        length = len(prompt_ids) + len(answer_ids)
        input_ids[row, :length] = torch.tensor([*prompt_ids, *answer_ids])
        labels[row, len(prompt_ids) : length] = torch.tensor(answer_ids)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def sampling_probabilities(levels: Sequence[int], level_weights: Mapping[int, float]) -> np.ndarray:
    """Per-example probabilities so that each level's total share follows `level_weights`.

    levels: (n,) level of each example -> (n,) probabilities summing to 1; within a
    level every example is equally likely.
    """
    levels_array = np.asarray(levels)
    distinct, counts = np.unique(levels_array, return_counts=True)
    weight_of = {
        int(level): float(level_weights.get(int(level), 1.0)) / count
        for level, count in zip(distinct, counts, strict=True)
    }
    weights = np.array([weight_of[int(level)] for level in levels_array], dtype=np.float64)
    if weights.sum() <= 0:
        raise ValueError("level_weights give every example zero weight")
    return weights / weights.sum()


@contextmanager
def _torch_threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_sft(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    problems: Sequence[str],
    answers: Sequence[str],
    levels: Sequence[int],
    config: SFTParams,
    *,
    seed: int = 0,
    num_threads: int = 2,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    validate: Callable[[int], float] | None = None,
) -> dict[str, float]:
    """Train `model` in place on answer tokens; return final metrics.

    `config` is params.yaml's `bootstrap.sft`. Each step draws `batch_size`
    examples with replacement (seeded by `seed`), levels weighted by
    `config.level_weights`; learning rate warms up linearly, then holds.
    Deterministic for a given seed and thread count (`num_threads` torch threads).
    Metrics: `sft/loss` (mean of the last 20 steps), `sft/steps`, `sft/wall_s`,
    `sft/examples_per_s`. `on_step(step, loss)` runs after every step (1-based),
    e.g. to log metrics or evaluate a learning curve; it may switch the model to
    eval mode, training mode is restored after it.

    With `config.target_accuracy` set and a `validate` callable (the accuracy of the
    model as it is), SFT checks every `config.check_every` steps and stops at the
    first check that reaches the target; `config.steps` is then the most steps.
    `validate(step)` may log its result (a learning curve). More metrics then:
    `sft/stop_accuracy` (validation accuracy at the stop) and `sft/target_reached` (1 or 0).
    """
    data = build_sft_batch(tokenizer, problems, answers)
    probabilities = sampling_probabilities(levels, config.level_weights)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps))
    )
    recent_losses: list[float] = []
    checks = validate if config.target_accuracy is not None else None
    accuracy, steps_done = float("nan"), 0
    model.train()
    started = time.perf_counter()
    with _torch_threads(num_threads):
        bar = tqdm(range(config.steps), desc="sft", disable=not progress)
        for step in bar:
            rows = torch.from_numpy(
                rng.choice(len(probabilities), config.batch_size, p=probabilities)
            )
            batch = {name: tensor[rows] for name, tensor in data.items()}
            # Drop columns that are padding in every row of this batch.
            length = int(batch["attention_mask"].sum(dim=1).max())
            batch = {name: tensor[:, :length] for name, tensor in batch.items()}
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            recent_losses = [*recent_losses[-19:], loss.item()]
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(recent_losses):.4f}")
            steps_done = step + 1
            if on_step is not None:
                on_step(steps_done, recent_losses[-1])
                model.train()
            if checks is not None and steps_done % config.check_every == 0:
                accuracy = _checked_accuracy(model, checks, steps_done)
                bar.set_postfix(loss=f"{np.mean(recent_losses):.4f}", val=f"{accuracy:.3f}")
                if accuracy >= config.target_accuracy:
                    break
    wall_s = time.perf_counter() - started
    model.eval()
    metrics = {
        "sft/loss": float(np.mean(recent_losses)) if recent_losses else float("nan"),
        "sft/steps": float(steps_done),
        "sft/wall_s": wall_s,
        "sft/examples_per_s": steps_done * config.batch_size / max(wall_s, 1e-9),
    }
    if checks is not None:
        metrics["sft/stop_accuracy"] = accuracy
        metrics["sft/target_reached"] = float(accuracy >= config.target_accuracy)
    return metrics


def _checked_accuracy(
    model: transformers.PreTrainedModel, validate: Callable[[int], float], step: int
) -> float:
    """`validate(step)` with the model in eval mode and no autograd, training mode restored."""
    model.eval()
    try:
        with torch.no_grad():
            return float(validate(step))
    finally:
        model.train()
