"""What every GRPO updater shares: the batch, the micro-batched loss, the optimiser step.

The RL math lives in `grpo.py`; this module only moves completions into tensors
and back, and owns the one zero_grad -> backward -> clip -> step sequence that the
in-process updater (`local.py`) and the worker group (`distributed.py`) both run.
B = completions in the update, L = longest prompt + response.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch
import transformers

from pipeline_lib.grpo import LossAggregation, policy_loss
from pipeline_lib.rollout.base import Completion

if TYPE_CHECKING:
    from pipeline_lib.config import TrainConfig


@dataclass(frozen=True)
class UpdateSettings:
    """The loss and optimiser knobs of one update (see `grpo.policy_loss`).

    Each field is the `train` params field of the same name (documented there);
    `from_train_config` copies them by name, so there is one default per knob.
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    loss_aggregation: LossAggregation = "token-mean"
    kl_coef: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_rows: int = 1024

    @classmethod
    def from_train_config(cls, config: TrainConfig) -> UpdateSettings:
        return cls(**{field.name: getattr(config, field.name) for field in fields(cls)})


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


def signal_rows(batch: UpdateBatch, settings: UpdateSettings) -> torch.Tensor:
    """Indices of the rows the update must see: those with a non-zero advantage.

    Zero-advantage rows carry no policy gradient, so (without a KL term) they are
    left out of the forward pass; `BatchNorms` keeps the loss equal to the full batch's.
    """
    keep = batch.advantages != 0
    if settings.kl_coef > 0:
        keep = torch.ones_like(keep)
    return torch.nonzero(keep).squeeze(-1)


@dataclass(frozen=True)
class BatchNorms:
    """Whole-batch counts that scale each micro-batch's loss.

    A micro-batch (or a data-parallel rank's share of the rows) weighs its loss by
    its part of the full batch, so the parts' gradients add up to the full
    batch's: exact for every aggregation mode.
    """

    tokens: float  # response tokens in the whole batch
    rows: float  # completions in the whole batch
    kept_tokens: float  # response tokens in the rows the update sees
    seq_norm: float  # padded length, the seq-sum-norm constant

    @classmethod
    def of(cls, batch: UpdateBatch, rows: torch.Tensor) -> BatchNorms:
        return cls(
            tokens=float(batch.response_mask.sum()),
            rows=float(batch.response_mask.shape[0]),
            kept_tokens=float(batch.response_mask[rows].sum()),
            seq_norm=float(batch.response_mask.shape[1]),
        )


def backward_rows(
    model: torch.nn.Module,
    batch: UpdateBatch,
    rows: torch.Tensor,
    settings: UpdateSettings,
    norms: BatchNorms,
    *,
    loss_scale: float = 1.0,
    min_micro_batches: int = 0,
) -> dict[str, float]:
    """Forward and backward over `rows` in micro-batches; gradients accumulate.

    `loss_scale` multiplies every loss (a data-parallel group that averages
    gradients over W ranks passes W). When `rows` fill fewer than
    `min_micro_batches` micro-batches, zero-weight ones make up the count: every
    rank of a sharded model must run the same number of forward and backward
    passes, or its collectives wait for ever. Returns diagnostics as sums over
    the rows' share of the batch (see `summarize`).
    """
    device = next(model.parameters()).device
    chunks = list(torch.split(rows, settings.micro_batch_rows))
    padding = max(min_micro_batches - len(chunks), 0)
    totals: dict[str, float] = {}
    for chunk in chunks:
        _backward_chunk(model, batch, chunk, settings, norms, loss_scale, device, totals)
    for _ in range(padding):
        _backward_chunk(
            model, batch, torch.zeros(1, dtype=torch.long), settings, norms, 0.0, device
        )
    return totals


def _backward_chunk(
    model: torch.nn.Module,
    batch: UpdateBatch,
    chunk: torch.Tensor,
    settings: UpdateSettings,
    norms: BatchNorms,
    loss_scale: float,
    device: torch.device,
    totals: dict[str, float] | None = None,
) -> None:
    mask = batch.response_mask[chunk].to(device)
    logprobs = token_logprobs(
        model, batch.input_ids[chunk].to(device), batch.attention_mask[chunk].to(device)
    )
    # One update per rollout batch: the behaviour policy is the current one, so the
    # importance ratio is exactly 1 and the clip only guards later epochs.
    loss, info = policy_loss(
        logprobs,
        logprobs.detach(),
        batch.advantages[chunk].to(device),
        mask,
        clip_low=settings.clip_low,
        clip_high=settings.clip_high,
        aggregation=settings.loss_aggregation,
        seq_sum_norm=norms.seq_norm,
    )
    # Rescale the chunk's aggregate to its share of the full batch.
    if settings.loss_aggregation == "token-mean":
        weight = float(mask.sum()) / norms.tokens
    elif settings.loss_aggregation == "seq-mean-token-mean":
        weight = float(mask.shape[0]) / norms.rows
    else:
        weight = 1.0
    (loss * weight * loss_scale).backward()
    if totals is None:  # a zero-weight padding pass: no diagnostics
        return
    _add(totals, "train/loss", float(loss.detach()) * weight)
    mismatch = (batch.sampled_logprobs[chunk].to(device) - logprobs.detach()) * mask
    _add(totals, "rollout/logprob_abs_diff_sum", float(mismatch.abs().sum()))
    _add(totals, "_tokens", float(mask.sum()))
    # Diagnostics (ratio, clip fraction, KL) average over the rows actually used.
    share = float(mask.sum()) / max(norms.kept_tokens, 1.0)
    for key, value in info.items():
        _add(totals, f"train/{key}", float(value) * share)


def _add(totals: dict[str, float], key: str, value: float) -> None:
    totals[key] = totals.get(key, 0.0) + value


def summarize(totals: dict[str, float]) -> dict[str, float]:
    """Turn `backward_rows` sums (added up over micro-batches or ranks) into diagnostics."""
    totals = dict(totals)
    tokens = totals.pop("_tokens", 0.0)
    # Engine vs trainer log-probabilities of the same tokens: a weight-sync check.
    totals["rollout/logprob_abs_diff"] = totals.pop("rollout/logprob_abs_diff_sum", 0.0) / max(
        tokens, 1.0
    )
    return totals


def apply_optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    backward: Callable[[], dict[str, float]],
    clip_grad_norm: Callable[[], torch.Tensor],
) -> tuple[dict[str, float], float]:
    """zero_grad -> `backward()` (accumulates gradients) -> `clip_grad_norm()` -> step.

    Returns the backward pass's diagnostic sums and the gradient norm before
    clipping. The model is in training mode only while the gradients are made.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    totals = backward()
    grad_norm = clip_grad_norm()
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    model.eval()
    return totals, float(grad_norm)


class Updater(Protocol):
    """Owns the optimiser and applies GRPO updates to the training loop's policy.

    After `update` the loop's model holds the new weights, whichever process
    computed them. `close` releases what the updater started.
    """

    def update(self, batch: UpdateBatch) -> dict[str, float]: ...
    def optimizer_state_dict(self) -> dict[str, Any]: ...
    def load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...
