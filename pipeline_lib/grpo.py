"""GRPO math on tensors: group-relative advantages for uneven groups, the PPO-clip
policy loss, and the effective-gradient ratio.

Pure functions in the style of verl's ``core_algos``: tensors in, tensors (or floats)
out, shapes in docstrings. ``B`` is the number of responses in a batch, ``T`` the
padded response length, ``G`` the number of groups (prompts) in the batch.

A group is the set of responses sampled for one prompt. Knapsack-RL gives prompts
different rollout counts, so groups have any size; a response's group is given by
an integer id per response (``group_ids``: LongTensor[B], any values, any order).
``group_ids_from_sizes`` builds them from per-prompt rollout counts.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

# verl clamps the log-ratio before exp so one wild token cannot overflow the ratio.
_LOG_RATIO_BOUND = 20.0
# verl caps the per-token k3 KL value at +-10 (`kl_penalty_forward`, "low_var_kl").
_K3_BOUND = 10.0


def group_ids_from_sizes(group_sizes: Tensor) -> Tensor:
    """Group id per response for responses laid out group after group.

    Args:
        group_sizes: LongTensor[G], rollouts per prompt (zeros allowed).

    Returns:
        LongTensor[B] with B = group_sizes.sum(): ``[0]*n_0 + [1]*n_1 + ...``.
    """
    group_sizes = torch.as_tensor(group_sizes, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(group_sizes)), group_sizes)


def _group_index(group_ids: Tensor) -> tuple[Tensor, Tensor, int]:
    """Dense group index per response (0..G-1), the sorted unique ids, and G."""
    unique_ids, inverse = torch.unique(group_ids, sorted=True, return_inverse=True)
    return unique_ids, inverse, len(unique_ids)


def _distinct_reward_counts(rewards: Tensor, inverse: Tensor, num_groups: int) -> Tensor:
    """Number of distinct reward values per group, LongTensor[G].

    Sort by (group, reward) and count positions where either changes. Equality is
    exact float equality: identical rewards never count as two outcomes, however a
    float std of them would round.
    """
    by_reward = torch.argsort(rewards, stable=True)
    order = by_reward[torch.argsort(inverse[by_reward], stable=True)]
    groups, values = inverse[order], rewards[order]
    is_new = torch.ones_like(groups, dtype=torch.bool)
    is_new[1:] = (groups[1:] != groups[:-1]) | (values[1:] != values[:-1])
    counts = torch.zeros(num_groups, dtype=torch.long, device=rewards.device)
    return counts.index_add_(0, groups, is_new.long())


def effective_gradient_ratio(rewards: Tensor, group_ids: Tensor) -> float:
    """Share of responses whose group holds more than one distinct reward value.

    The paper's "effective-gradient ratio": responses in all-success or all-failure
    groups get zero advantage and contribute nothing to the update.

    Args:
        rewards: Tensor[B].
        group_ids: LongTensor[B].

    Returns:
        A float in [0, 1]; NaN for an empty batch.
    """
    if rewards.numel() == 0:
        return float("nan")
    _, inverse, num_groups = _group_index(group_ids)
    has_signal = _distinct_reward_counts(rewards, inverse, num_groups) > 1
    return has_signal[inverse].float().mean().item()


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
    clip: float | None = 5.0,
) -> Tensor:
    """GRPO outcome advantages, normalised within each group of any size.

    ``A_i = (r_i - mean_g) / (std_g + eps)`` over the responses of i's group g, with
    the unbiased (n - 1) standard deviation as ``torch.std`` and verl use. With
    ``normalize_std=False`` it is ``r_i - mean_g`` (Dr. GRPO). Groups whose rewards
    are all equal (including groups of size 1) get exactly 0, decided by distinct
    values (as ``effective_gradient_ratio`` decides signal), so float round-off never leaks a tiny
    advantage into an all-equal group. ``clip`` bounds the result to ``[-clip, clip]``:
    one success among 93 rollouts gives ``z ~ 9.5`` unclipped; the paper clips at 5.

    Args:
        rewards: Tensor[B] (float), one scalar reward per response.
        group_ids: LongTensor[B], the group of each response.
        normalize_std: divide by the group std (GRPO) or not (Dr. GRPO).
        eps: added to the std.
        clip: symmetric bound on advantages; None for no clipping.

    Returns:
        Tensor[B] of advantages, dtype of ``rewards``; no gradient.
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_ids must be 1-D of equal shape, got "
            f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    rewards = rewards.detach()
    _, inverse, num_groups = _group_index(group_ids)
    # float64 statistics: groups of ~100 rewards lose digits in float32 sums.
    r = rewards.to(torch.float64)
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    counts = zeros.index_add(0, inverse, torch.ones_like(r))
    means = zeros.index_add(0, inverse, r) / counts
    centred = r - means[inverse]
    if normalize_std:
        sq_sums = zeros.index_add(0, inverse, centred.square())
        # Size-1 groups would divide by zero; their advantage is forced to 0 below.
        stds = (sq_sums / (counts - 1).clamp(min=1)).sqrt()
        centred = centred / (stds[inverse] + eps)
    has_signal = _distinct_reward_counts(r, inverse, num_groups) > 1
    advantages = torch.where(has_signal[inverse], centred, torch.zeros_like(centred))
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages.to(rewards.dtype)


def group_loss_weights(group_ids: Tensor, rollouts_per_prompt: int) -> Tensor:
    """Per-response weights N_avg / n_g that give every group the same total weight.

    Token-mean over a batch weighs a group by its size: a 96-rollout group counts 12x an
    8-rollout one, so an allocation that varies group sizes changes the objective's
    weights as well as its information. Multiplying each response's loss by these
    weights (`group_weighting: equal`) separates the two. The PPO-clip loss is linear in
    the advantage for a positive factor, so scaling the advantages by the weights is the
    same as scaling the per-token losses.

    Args:
        group_ids: LongTensor[B], the group of each response.
        rollouts_per_prompt: N_avg.

    Returns:
        FloatTensor[B], N_avg / size of the response's group.
    """
    _, inverse, num_groups = _group_index(group_ids)
    sizes = torch.zeros(num_groups, dtype=torch.float32).index_add(
        0, inverse, torch.ones(inverse.numel(), dtype=torch.float32)
    )
    return float(rollouts_per_prompt) / sizes[inverse]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1; 0 for an empty mask.

    Args:
        values: Tensor[B, T].
        mask: Tensor[B, T] of 0/1 (bool or float).
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def aggregation_count(loss_mask: Tensor, mode: LossAggregation) -> Tensor:
    """What ``aggregate_loss`` divides by in ``mode`` over these rows: a scalar tensor.

    Valid tokens (``token-mean``); sequences with at least one valid token
    (``seq-mean-token-mean``: an empty response counts in neither); 1 for
    ``seq-mean-token-sum-norm``, whose divisor is a constant. Parts of a batch whose
    losses are weighted by ``count(part) / max(count(batch), 1)`` add up to the whole
    batch's loss and gradient exactly, given one ``seq_sum_norm`` for all parts (the
    micro-batch weights of ``update.core``).

    Args:
        loss_mask: Tensor[B, T], floating 0/1, 1 for response tokens.
        mode: an aggregation mode, as in ``aggregate_loss``.
    """
    if mode == "token-mean":
        return loss_mask.sum()
    if mode == "seq-mean-token-mean":
        return (loss_mask.sum(dim=-1) > 0).to(loss_mask.dtype).sum()
    if mode == "seq-mean-token-sum-norm":
        return loss_mask.new_ones(())
    raise ValueError(f"unknown loss aggregation mode: {mode!r}")


def aggregate_loss(
    loss_mat: Tensor,
    loss_mask: Tensor,
    mode: LossAggregation = "token-mean",
    *,
    seq_sum_norm: float | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar, as verl's ``agg_loss``.

    - ``token-mean``: sum over all valid tokens / number of valid tokens (DAPO).
    - ``seq-mean-token-mean``: per-sequence mean over its valid tokens, then the mean
      over sequences that have at least one valid token (original GRPO).
    - ``seq-mean-token-sum-norm``: sum over sequences of per-sequence token sums,
      divided by the constant ``seq_sum_norm`` (default ``T``, the padded response
      length), so no length-dependent weighting (Dr. GRPO).

    The two means divide by ``aggregation_count``, clamped to at least 1 (no valid
    token gives 0).

    Args:
        loss_mat: Tensor[B, T], per-token loss.
        loss_mask: Tensor[B, T], 1 for response tokens, 0 for padding.
        mode: one of the three above.
        seq_sum_norm: the constant for ``seq-mean-token-sum-norm``.

    Returns:
        A scalar tensor.
    """
    mask = loss_mask.to(loss_mat.dtype)
    count = aggregation_count(mask, mode).clamp(min=1.0)
    if mode == "token-mean":
        return (loss_mat * mask).sum() / count
    token_sums = (loss_mat * mask).sum(dim=-1)
    if mode == "seq-mean-token-mean":
        return (token_sums / mask.sum(dim=-1).clamp(min=1.0)).sum() / count
    norm = float(loss_mat.shape[-1]) if seq_sum_norm is None else seq_sum_norm
    return token_sums.sum() / norm


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || ref), ``exp(d) - d - 1`` with ``d = ref - logp``,
    clamped exactly as verl's ``kl_penalty_forward(..., "low_var_kl")`` (alias "k3"; not
    the straight-through "k3+") in ``verl/trainer/ppo/core_algos.py``.

    k3 is non-negative and unbiased for tokens sampled from the policy (Schulman 2020).
    Both of verl's clamps, with ``torch.clamp`` as verl has them:

    - ``d`` to [-20, 20] first, so ``exp`` stays finite; without it a float32
      ``exp(d > 88)`` is inf and the capped token's gradient ``0 * inf`` is NaN.
    - the k3 value to [-10, 10] (in effect ``<= 10``: k3 >= 0). Beyond the cap (``d``
      above about 2.61 or below about -11) the value is 10 and the gradient 0, so one
      token far from the reference cannot dominate the KL term or its gradient. The
      cap is reached before the log-ratio clamp, which only keeps ``exp`` finite.

    Args:
        logprobs, ref_logprobs: Tensor[B, T].

    Returns:
        Tensor[B, T], in [0, 10].
    """
    log_ratio = torch.clamp(ref_logprobs - logprobs, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1.0, -_K3_BOUND, _K3_BOUND)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    aggregation: LossAggregation = "token-mean",
    seq_sum_norm: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip policy loss with sequence-level advantages (GRPO).

    Per token, with ``ratio = exp(logp - old_logp)``::

        loss = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))

    and, for ``A < 0`` with ``dual_clip`` set (verl's dual clip), the loss is capped
    at ``dual_clip * |A|`` so a token whose ratio exploded cannot dominate the batch.
    The per-token loss is reduced by ``aggregate_loss``. With ``ref_logprobs`` given,
    the k3 KL to the reference is reduced the same way and, times ``kl_coef``, added.

    Args:
        logprobs: Tensor[B, T], log-probs of the sampled tokens under the policy
            being trained (the only input the gradient flows through).
        old_logprobs: Tensor[B, T], the same under the policy that sampled them.
        advantages: Tensor[B], one advantage per response, broadcast over tokens.
        response_mask: Tensor[B, T], 1 for response tokens, 0 for padding.
        clip_low, clip_high: the asymmetric clip range (DAPO's clip-higher).
        dual_clip: the dual-clip constant (> 1), or None to turn it off.
        aggregation: how tokens are reduced; see ``aggregate_loss``.
        seq_sum_norm: the constant for ``seq-mean-token-sum-norm`` (default T).
        ref_logprobs: Tensor[B, T] under the reference policy, or None.
        kl_coef: weight of the KL term (off by default, as in the paper).
        token_weights: Tensor[B, T] multiplying each token's policy loss before
            aggregation (truncated importance sampling), or None.

    Returns:
        (loss: scalar Tensor, diagnostics) where diagnostics, all floats, are
        ``pg_loss`` (the loss without the KL term), ``pg_clipfrac`` (share of tokens
        where the clipped branch is active), ``pg_clipfrac_lower`` (share capped by
        the dual clip), ``ppo_kl`` (mean of ``old_logp - logp``, the approximate
        KL(old || new)), ``ratio_mean`` and, with ``ref_logprobs``, ``kl_ref`` (k3).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    old_logprobs = old_logprobs.detach()
    mask = response_mask.to(logprobs.dtype)
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(-1)  # [B, 1]

    log_ratio = (logprobs - old_logprobs).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = torch.zeros_like(clip_active)
    if dual_clip is not None:
        cap = -adv * dual_clip  # positive where A < 0
        negative = (adv < 0).expand_as(token_loss)
        dual_active = negative & (token_loss > cap)
        token_loss = torch.where(negative, torch.minimum(token_loss, cap), token_loss)
    if token_weights is not None:
        token_loss = token_loss * token_weights.detach()

    pg_loss = aggregate_loss(token_loss, mask, aggregation, seq_sum_norm=seq_sum_norm)
    loss = pg_loss
    with torch.no_grad():
        diagnostics = {
            "pg_loss": pg_loss.item(),
            "pg_clipfrac": masked_mean(clip_active.to(mask.dtype), mask).item(),
            "pg_clipfrac_lower": masked_mean(dual_active.to(mask.dtype), mask).item(),
            "ppo_kl": masked_mean(-log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    if ref_logprobs is not None:
        kl = aggregate_loss(
            kl_k3(logprobs, ref_logprobs.detach()), mask, aggregation, seq_sum_norm=seq_sum_norm
        )
        diagnostics["kl_ref"] = kl.item()
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl
    return loss, diagnostics
