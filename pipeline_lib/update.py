"""One GRPO policy update in torch: batch completions, score tokens, step the optimiser.

The RL math lives in `grpo.py`; this module only moves completions into tensors
and back. B = completions in the update, L = longest prompt + response.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import transformers

from pipeline_lib.grpo import LossAggregation, policy_loss
from pipeline_lib.rollout.base import Completion


@dataclass(frozen=True)
class UpdateSettings:
    """The loss and optimiser knobs of one update (see `grpo.policy_loss`)."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    aggregation: LossAggregation = "token-mean"
    kl_coef: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_rows: int = 1024


@dataclass(frozen=True)
class UpdateBatch:
    """Completions as right-padded tensors.

    input_ids: LongTensor[B, L], prompt then response then padding.
    attention_mask: LongTensor[B, L].
    response_mask: FloatTensor[B, L-1], 1 where target token t+1 is a response token.
    sampled_logprobs: FloatTensor[B, L-1], the engine's logprob of each response token.
    advantages: FloatTensor[B].
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    sampled_logprobs: torch.Tensor
    advantages: torch.Tensor


def build_update_batch(
    completions: Sequence[Completion], advantages: torch.Tensor, pad_token_id: int
) -> UpdateBatch:
    """Stack completions (any prompt lengths) into one right-padded batch."""
    if len(completions) != advantages.numel():
        raise ValueError(f"{len(completions)} completions but {advantages.numel()} advantages")
    lengths = [len(c.prompt_token_ids) + len(c.token_ids) for c in completions]
    width = max(lengths)
    rows = len(completions)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    response = torch.zeros((rows, width - 1))
    sampled = torch.zeros((rows, width - 1))
    for row, completion in enumerate(completions):
        prompt_len, total = len(completion.prompt_token_ids), lengths[row]
        input_ids[row, :total] = torch.tensor(completion.prompt_token_ids + completion.token_ids)
        attention[row, :total] = 1
        # Target position t predicts token t + 1: response tokens are targets
        # prompt_len - 1 .. total - 2.
        response[row, prompt_len - 1 : total - 1] = 1.0
        sampled[row, prompt_len - 1 : total - 1] = torch.tensor(completion.logprobs)
    return UpdateBatch(input_ids, attention, response, sampled, advantages.float())


def token_logprobs(
    model: transformers.PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Log-probability of every next token under `model`: FloatTensor[B, L-1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)


def grpo_update(
    model: transformers.PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: UpdateBatch,
    settings: UpdateSettings,
) -> dict[str, float]:
    """One on-policy update over the batch; returns namespaced diagnostics.

    Rows whose advantage is zero carry no policy gradient, so (when there is no KL
    term) they are left out of the forward pass and the loss is rescaled to what
    the full batch would give: exact for every aggregation mode.
    """
    started = time.perf_counter()
    model.train()
    keep = batch.advantages != 0
    if settings.kl_coef > 0:
        keep = torch.ones_like(keep)
    rows = torch.nonzero(keep).squeeze(-1)
    stats = {
        "train/rows_with_signal": float(rows.numel()),
        "train/loss": 0.0,
        "train/grad_norm": 0.0,
    }
    if rows.numel() == 0:
        return stats | {"train/update_seconds": time.perf_counter() - started}

    full_tokens = float(batch.response_mask.sum())
    kept_tokens = float(batch.response_mask[rows].sum())
    full_rows = float(batch.response_mask.shape[0])
    seq_norm = float(batch.response_mask.shape[1])
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    for chunk in torch.split(rows, settings.micro_batch_rows):
        mask = batch.response_mask[chunk]
        logprobs = token_logprobs(model, batch.input_ids[chunk], batch.attention_mask[chunk])
        # One update per rollout batch: the behaviour policy is the current one, so
        # the importance ratio is exactly 1 and the clip only guards later epochs.
        loss, info = policy_loss(
            logprobs,
            logprobs.detach(),
            batch.advantages[chunk],
            mask,
            clip_low=settings.clip_low,
            clip_high=settings.clip_high,
            aggregation=settings.aggregation,
            seq_sum_norm=seq_norm,
        )
        # Rescale the chunk's aggregate to its share of the full batch.
        if settings.aggregation == "token-mean":
            weight = float(mask.sum()) / full_tokens
        elif settings.aggregation == "seq-mean-token-mean":
            weight = float(mask.shape[0]) / full_rows
        else:
            weight = 1.0
        (loss * weight).backward()
        totals["train/loss"] = totals.get("train/loss", 0.0) + float(loss.detach()) * weight
        mismatch = (batch.sampled_logprobs[chunk] - logprobs.detach()) * mask
        totals["rollout/logprob_abs_diff_sum"] = totals.get(
            "rollout/logprob_abs_diff_sum", 0.0
        ) + float(mismatch.abs().sum())
        totals["_tokens"] = totals.get("_tokens", 0.0) + float(mask.sum())
        # Diagnostics (ratio, clip fraction, KL) average over the rows actually used.
        share = float(mask.sum()) / max(kept_tokens, 1.0)
        for key, value in info.items():
            totals[f"train/{key}"] = totals.get(f"train/{key}", 0.0) + float(value) * share
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    optimizer.step()
    model.eval()
    tokens = totals.pop("_tokens")
    # Engine vs trainer log-probabilities of the same tokens: a weight-sync check.
    totals["rollout/logprob_abs_diff"] = totals.pop("rollout/logprob_abs_diff_sum") / max(
        tokens, 1.0
    )
    return (
        stats
        | totals
        | {
            "train/grad_norm": float(grad_norm),
            "train/update_seconds": time.perf_counter() - started,
        }
    )
