"""Supervised warm-up of a policy on (problem, answer) pairs, and a quick accuracy check.

The warm-up gives the embedded tiny model success rates spread across (0, 1)
over difficulty levels, which is where GRPO (and Knapsack allocation) have
something to work with; it is deliberately short so RL has room to improve.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

IGNORE_INDEX = -100  # label value that Hugging Face losses skip


def _default_level_weights() -> dict[int, float]:
    # Measured (scripts/measure_sft.py): with 4,4,2,2,1,1 levels 1-3 saturate while
    # 4-5 stay near 0.1; shifting weight from level 3 to levels 4-5 spreads them out.
    return {1: 4.0, 2: 4.0, 3: 1.0, 4: 2.0, 5: 2.0, 6: 1.0}


@dataclass(frozen=True)
class SFTConfig:
    """Supervised warm-up settings (defaults: the recipe measured for the tiny policy)."""

    learning_rate: float = 2e-3
    """Peak AdamW learning rate, reached after `warmup_steps` and then held."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warm-up from zero."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    batch_size: int = 256
    """Examples per optimiser step."""
    num_steps: int = 440
    """Optimiser steps. Held-out accuracy jumps between about 420 and 480 steps
    (levels 3-5 learn carrying); 440 stops partway, so RL has room to improve."""
    level_weights: Mapping[int, float] = field(default_factory=_default_level_weights)
    """Relative sampling weight of each difficulty level (levels not listed weigh 1)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    seed: int = 0
    """Seed of the batch sampling."""
    num_threads: int = 2
    """torch CPU threads while training."""


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
    config: SFTConfig,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train `model` in place on answer tokens; return final metrics.

    Each step draws `batch_size` examples with replacement, levels weighted by
    `config.level_weights`. Deterministic for a given seed and thread count.
    Metrics: `sft/loss` (mean of the last 20 steps), `sft/steps`, `sft/wall_s`,
    `sft/examples_per_s`. `on_step(step, loss)` runs after every step (1-based),
    e.g. to log metrics or evaluate a learning curve; it may switch the model to
    eval mode, training mode is restored after it.
    """
    data = build_sft_batch(tokenizer, problems, answers)
    probabilities = sampling_probabilities(levels, config.level_weights)
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, config.warmup_steps))
    )
    recent_losses: list[float] = []
    model.train()
    started = time.perf_counter()
    with _torch_threads(config.num_threads):
        bar = tqdm(range(config.num_steps), desc="sft", disable=not progress)
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
            if on_step is not None:
                on_step(step + 1, recent_losses[-1])
                model.train()
    wall_s = time.perf_counter() - started
    model.eval()
    return {
        "sft/loss": float(np.mean(recent_losses)) if recent_losses else float("nan"),
        "sft/steps": float(config.num_steps),
        "sft/wall_s": wall_s,
        "sft/examples_per_s": config.num_steps * config.batch_size / max(wall_s, 1e-9),
    }


@torch.no_grad()
def sample_completions(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    problems: Sequence[str],
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 8,
    batch_size: int = 256,
    seed: int = 0,
) -> list[list[str]]:
    """Generate `num_samples` completions per problem (greedy when temperature is 0).

    Returns one list of decoded completions (special tokens removed) per problem.
    Uses Hugging Face `generate`: fine for a quick check, not for rollouts.
    """
    greedy = temperature <= 0.0
    per_prompt = 1 if greedy else num_samples
    completions: list[list[str]] = []
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(problems), batch_size):
            chunk = list(problems[start : start + batch_size])
            inputs = _left_padded(tokenizer, chunk)
            sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
            output = model.generate(
                **inputs,
                do_sample=not greedy,
                num_return_sequences=per_prompt,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            texts = tokenizer.batch_decode(
                output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for index in range(len(chunk)):
                group = texts[index * per_prompt : (index + 1) * per_prompt]
                completions.append(group * num_samples if greedy else group)
    return completions


def completion_accuracy(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    problems: Sequence[str],
    answers: Sequence[str],
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Share of each problem's completions that equal its answer exactly (after strip).

    Returns (n,) floats in [0, 1]; greedy decoding gives 0 or 1 per problem.
    """
    completions = sample_completions(
        model, tokenizer, problems, num_samples=num_samples, temperature=temperature, seed=seed
    )
    return np.array(
        [
            np.mean([text.strip() == answer.strip() for text in group])
            for group, answer in zip(completions, answers, strict=True)
        ]
    )


def _left_padded(
    tokenizer: transformers.PreTrainedTokenizerBase, problems: Sequence[str]
) -> dict[str, torch.Tensor]:
    # Prompts are left-padded so every completion starts at the same column.
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in problems]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
