"""What every GRPO updater shares: the batch, the micro-batched loss, the optimiser step.

The RL math lives in `grpo.py`; this module only moves completions into tensors
and back, and owns the one zero_grad -> backward -> clip -> step sequence that the
in-process updater (`local.py`) and the worker group (`distributed.py`) both run.
B = completions in the update, L = longest prompt + response.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch
import transformers

from pipeline_lib.grpo import LossAggregation, aggregation_count, policy_loss
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
    ppo_mini_batches: int = 1
    ppo_epochs: int = 1
    tis_cap: float | None = None
    max_new_tokens: int = 8  # the constant of seq-mean-token-sum-norm (Dr. GRPO, verl)

    @property
    def optimizer_steps(self) -> int:
        return self.ppo_mini_batches * self.ppo_epochs

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
    prompt_lengths: LongTensor[B], prompt tokens of each row (response tokens follow).
    old_logprobs: FloatTensor[B, L-1] under the policy that generated the rollouts, as
        the trainer computes it (`score_rows`, before the first optimizer step); None
        when one optimizer step makes the current policy the old one.
    ref_logprobs: FloatTensor[B, L-1] under the frozen reference policy (KL term), or None.
    shuffle_seed: seeds the row order of the PPO mini-batches (`mini_batches`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    sampled_logprobs: torch.Tensor
    advantages: torch.Tensor
    prompt_lengths: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    shuffle_seed: int = 0

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])


def build_update_batch(
    completions: Sequence[Completion],
    advantages: torch.Tensor,
    pad_token_id: int,
    shuffle_seed: int = 0,
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
    prompt_lengths = torch.tensor([len(c.prompt_token_ids) for c in completions])
    return UpdateBatch(
        input_ids,
        attention,
        response,
        sampled,
        advantages.float(),
        prompt_lengths,
        shuffle_seed=shuffle_seed,
    )


def token_logprobs(
    model: transformers.PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Log-probability of every next token under `model`: FloatTensor[B, L-1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)


def response_logprobs(
    model: torch.nn.Module, batch: UpdateBatch, rows: torch.Tensor
) -> torch.Tensor:
    """`token_logprobs` of `rows` at their response targets, zeros at the prompt's:
    FloatTensor[len(rows), L-1] on the model's device, with each prompt run once.

    GRPO samples several completions per prompt, and causal attention makes a prompt's
    keys and values the same in each of them. Pass 1 runs each distinct prompt but its
    last token once (right-padded: padding after real tokens changes nothing under
    causal attention); its KV cache is copied to the prompt's rows. Pass 2 runs each
    row's last prompt token and response tokens against that cache, with the padding
    between them masked. Gradients reach the shared prompt positions through the
    cache's copies. On the embedded default (9-token prompts, 8 rows each) that halves
    the tokens the update runs through the model. Always two forward passes, whatever
    the rows: every rank of a sharded model runs the same collectives.
    """
    device = next(model.parameters()).device
    ids, prompt_lengths = batch.input_ids[rows], batch.prompt_lengths[rows]
    response_lengths = batch.attention_mask[rows].sum(-1) - prompt_lengths
    distinct: dict[tuple[int, ...], int] = {}
    row_prefix = torch.tensor(
        [
            distinct.setdefault(tuple(row[: length - 1].tolist()), len(distinct))
            for row, length in zip(ids, prompt_lengths.tolist(), strict=True)
        ]
    )
    # At least one column, so that pass 1 runs (and its collectives) for 1-token prompts.
    width = max(1, *(len(prefix) for prefix in distinct))
    prefix_ids = torch.zeros((len(distinct), width), dtype=torch.long)
    prefix_mask = torch.zeros((len(distinct), width), dtype=torch.long)
    for index, prefix in enumerate(distinct):
        prefix_ids[index, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        prefix_mask[index, : len(prefix)] = 1
    # No config: plain full-length cache layers (a sliding-window layer would crop the
    # padded prefix from the wrong end); the attention masks still apply the window.
    cache = transformers.DynamicCache()
    model(input_ids=prefix_ids.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_select_indices(row_prefix.to(device))

    # Pass 2, row r: its last prompt token, then its response; column j predicts the
    # token at position prompt_lengths[r] + j, i.e. target index prompt_lengths[r] - 1 + j.
    steps = int(response_lengths.max()) + 1
    columns = torch.arange(steps)
    real = columns < (response_lengths + 1).unsqueeze(-1)
    positions = (prompt_lengths - 1).unsqueeze(-1) + columns
    tokens = ids.gather(1, positions.clamp(max=ids.shape[1] - 1)).masked_fill(~real, 0)
    attention = torch.cat([prefix_mask[row_prefix], real.long()], dim=1)
    logits = (
        model(
            input_ids=tokens.to(device),
            attention_mask=attention.to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
            use_cache=True,
        )
        .logits[:, :-1]
        .float()
    )
    targets = tokens[:, 1:].to(device).unsqueeze(-1)
    scored = torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)
    # Into the [rows, L-1] layout: response target j of row r sits at prompt_len - 1 + j.
    is_response = real[:, 1:]
    out = scored.new_zeros((len(rows), ids.shape[1] - 1))
    row_index = torch.arange(len(rows)).unsqueeze(-1).expand_as(is_response)
    out[row_index[is_response].to(device), positions[:, :-1][is_response].to(device)] = scored[
        is_response.to(device)
    ]
    return out


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
    """Counts over one optimizer step's rows that scale each micro-batch's loss.

    A micro-batch (or a data-parallel rank's share of the rows) weighs its loss by
    its part of what the step's loss divides by (`grpo.aggregation_count` over the
    whole batch, or one PPO mini-batch): valid tokens, or completions with at least
    one response token, so an empty response counts as the loss counts it. The
    parts' gradients then add up to the step's: exact for every aggregation mode.
    """

    loss_count: float  # `aggregation_count` of the step's rows, in the settings' mode
    kept_tokens: float  # response tokens in the rows the update sees
    seq_norm: float  # the seq-mean-token-sum-norm constant (max_new_tokens)

    @classmethod
    def of(
        cls,
        batch: UpdateBatch,
        rows: torch.Tensor,
        settings: UpdateSettings,
        members: torch.Tensor | None = None,
    ) -> BatchNorms:
        """Norms of the step over `members` (default: every row) whose `rows` carry signal."""
        mask = batch.response_mask if members is None else batch.response_mask[members]
        return cls(
            loss_count=float(aggregation_count(mask, settings.loss_aggregation)),
            kept_tokens=float(batch.response_mask[rows].sum()),
            seq_norm=float(settings.max_new_tokens),
        )


def mini_batches(batch: UpdateBatch, settings: UpdateSettings) -> list[torch.Tensor]:
    """Row indices of each optimizer step, in order: `ppo_epochs` passes over the batch,
    each split into `ppo_mini_batches` parts.

    With several mini-batches the rows are shuffled across groups first (a new seeded
    order per pass), as the official KnapsackRL fork does (it shuffles the rows before
    generation): otherwise the rows of one prompt, up to N_up of them, stay together and
    one 90-rollout group fills a mini-batch. One mini-batch keeps the rows in order, so
    its step is the full-batch gradient exactly as before.
    """
    if settings.ppo_mini_batches == 1:
        return [torch.arange(batch.rows) for _ in range(settings.ppo_epochs)]
    passes = []
    for epoch in range(settings.ppo_epochs):
        generator = torch.Generator().manual_seed(batch.shuffle_seed * 1_000 + epoch)
        order = torch.randperm(batch.rows, generator=generator)
        passes += [part for part in torch.tensor_split(order, settings.ppo_mini_batches)]
    return [part for part in passes if part.numel()]


def score_rows(
    model: torch.nn.Module,
    batch: UpdateBatch,
    rows: torch.Tensor,
    micro_batch_rows: int,
) -> torch.Tensor:
    """Response-token logprobs FloatTensor[B, L-1] of `rows` under `model`, no gradient
    (zeros elsewhere): the old policy's before the first step, or the reference's."""
    scores = torch.zeros(batch.response_mask.shape)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for chunk in torch.split(rows, micro_batch_rows):
            scores[chunk] = response_logprobs(model, batch, chunk).cpu()
    model.train(was_training)
    return scores


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
    logprobs = response_logprobs(model, batch, chunk)
    # With one optimizer step the policy being trained is still the one that made the
    # rollouts: its detached logprobs are the old ones exactly (the ratio is 1).
    old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs[chunk]
    old = old.to(device)
    ref = None if batch.ref_logprobs is None else batch.ref_logprobs[chunk].to(device)
    sampled = batch.sampled_logprobs[chunk].to(device)
    loss, info = policy_loss(
        logprobs,
        old,
        batch.advantages[chunk].to(device),
        mask,
        clip_low=settings.clip_low,
        clip_high=settings.clip_high,
        aggregation=settings.loss_aggregation,
        seq_sum_norm=norms.seq_norm,
        ref_logprobs=ref,
        kl_coef=settings.kl_coef,
        token_weights=tis_weights(old, sampled, settings.tis_cap),
    )
    # Rescale the chunk's aggregate to its share of the step's divisor (clamped to 1
    # as `aggregate_loss` clamps it, so a step of empty responses weighs 0, not 0/0).
    count = float(aggregation_count(mask, settings.loss_aggregation))
    weight = count / max(norms.loss_count, 1.0)
    (loss * weight * loss_scale).backward()
    if totals is None:  # a zero-weight padding pass: no diagnostics
        return
    _add(totals, "train/loss", float(loss.detach()) * weight)
    mismatch = (sampled - old) * mask
    _add(totals, "rollout/logprob_abs_diff_sum", float(mismatch.abs().sum()))
    _add(totals, "_tokens", float(mask.sum()))
    # Diagnostics (ratio, clip fraction, KL) average over the rows actually used.
    share = float(mask.sum()) / max(norms.kept_tokens, 1.0)
    for key, value in info.items():
        _add(totals, f"train/{key}", float(value) * share)


def tis_weights(
    trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, cap: float | None
) -> torch.Tensor | None:
    """Truncated importance weights min(pi_trainer / pi_engine, cap) per token [B, T].

    Corrects for the rollout engine's numerics differing from the trainer's (bf16
    kernels, another attention implementation); applied per token before the loss is
    aggregated, so it acts (verl's cap, applied after aggregation, does not).
    """
    if cap is None:
        return None
    return torch.exp(trainer_logprobs - engine_logprobs).clamp(max=cap).detach()


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


StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[dict[str, float], float]]
"""One optimizer step over (members, rows): the step's rows and those with signal."""

# Diagnostics that are constant by construction with a single optimizer step (the
# ratio is exactly 1): not reported then, so no chart shows a flat line as a finding.
ON_POLICY_CONSTANTS = (
    "train/pg_clipfrac",
    "train/pg_clipfrac_lower",
    "train/ppo_kl",
    "train/ratio_mean",
)


def run_ppo_steps(batch: UpdateBatch, settings: UpdateSettings, step: StepFn) -> dict[str, float]:
    """The optimizer steps of one update: each of `mini_batches` through `step`.

    Returns the steps' diagnostics averaged (the engine-vs-trainer logprob check from
    the first step, taken before any weight changed) and `train/optimizer_steps`.
    """
    signal = torch.zeros(batch.rows, dtype=torch.bool)
    signal[signal_rows(batch, settings)] = True
    per_step = []
    for members in mini_batches(batch, settings):
        rows = members[signal[members]]
        if rows.numel() == 0:  # no row of this mini-batch carries a gradient
            continue
        totals, grad_norm = step(members, rows)
        per_step.append(summarize(totals) | {"train/grad_norm": grad_norm})
    if not per_step:
        return {"train/optimizer_steps": 0.0}
    stats = {key: sum(s[key] for s in per_step) / len(per_step) for key in per_step[0]}
    stats["rollout/logprob_abs_diff"] = per_step[0]["rollout/logprob_abs_diff"]
    if settings.optimizer_steps == 1 and settings.tis_cap is None:
        stats = {k: v for k, v in stats.items() if k not in ON_POLICY_CONSTANTS}
    return stats | {"train/optimizer_steps": float(len(per_step))}


def with_old_and_ref_logprobs(
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    batch: UpdateBatch,
    settings: UpdateSettings,
) -> UpdateBatch:
    """The batch with the logprobs the steps need computed once, before the first step.

    Old logprobs only when more than one optimizer step (or the TIS correction) needs
    them; reference logprobs only with a KL term. Both cover the rows with signal.
    """
    rows = signal_rows(batch, settings)
    old = ref = None
    if settings.optimizer_steps > 1 or settings.tis_cap is not None:
        old = score_rows(model, batch, rows, settings.micro_batch_rows)
    if reference is not None and settings.kl_coef > 0:
        ref = score_rows(reference, batch, rows, settings.micro_batch_rows)
    return dataclasses.replace(batch, old_logprobs=old, ref_logprobs=ref)


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
