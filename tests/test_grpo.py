"""Tests for pipeline_lib.grpo: hand-computed cases, a loop oracle, loss aggregation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.grpo import (
    aggregate_loss,
    aggregation_count,
    effective_gradient_ratio,
    group_advantages,
    group_ids_from_sizes,
    group_loss_weights,
    kl_k3,
    policy_loss,
)


def loop_group_advantages(rewards, group_ids, normalize_std=True, eps=1e-6, clip=5.0):
    """Oracle: one group at a time in plain Python."""
    out = [0.0] * len(rewards)
    for g in set(group_ids):
        idx = [i for i, gid in enumerate(group_ids) if gid == g]
        values = [rewards[i] for i in idx]
        if len(set(values)) < 2:
            continue  # all-equal groups (and size 1) carry no signal
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        for i in idx:
            a = rewards[i] - mean
            if normalize_std:
                a /= std + eps
            if clip is not None:
                a = max(-clip, min(clip, a))
            out[i] = a
    return out


def test_one_success_in_four_gives_known_advantages():
    """Group [1,0,0,0]: mean 0.25, unbiased std 0.5 -> advantages 1.5 and -0.5."""
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5, rtol=0)


def test_one_success_in_93_is_clipped_at_5():
    """Unclipped z = 92 / sqrt(93) ~ 9.54 for the success; the paper clips at 5."""
    rewards = torch.zeros(93)
    rewards[7] = 1.0
    ids = torch.zeros(93, dtype=torch.long)
    raw = group_advantages(rewards, ids, clip=None)
    assert raw[7].item() == pytest.approx(92 / math.sqrt(93), rel=1e-5)
    clipped = group_advantages(rewards, ids, clip=5.0)
    assert clipped[7].item() == 5.0
    assert clipped[0].item() == pytest.approx(-1 / math.sqrt(93), rel=1e-5)


def test_size_one_and_all_equal_groups_get_exact_zero_without_nan():
    rewards = torch.tensor([1.0, 0.3, 0.3, 0.3, 0.0, 0.0, 1.0])
    ids = torch.tensor([5, 2, 2, 2, 9, 9, 9])
    for normalize_std in (True, False):
        adv = group_advantages(rewards, ids, normalize_std=normalize_std)
        assert not torch.isnan(adv).any()
        assert adv[:4].eq(0.0).all()
        assert adv[4:].ne(0.0).all()


def test_dr_grpo_skips_std_normalisation():
    adv = group_advantages(
        torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long), normalize_std=False
    )
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_group_ids_from_sizes_lays_out_groups_in_order():
    assert group_ids_from_sizes(torch.tensor([2, 0, 3])).tolist() == [0, 0, 2, 2, 2]


def test_non_finite_rewards_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(-3, 40), st.sampled_from([0.0, 0.25, 1.0])), min_size=1, max_size=60
    ),
    normalize_std=st.booleans(),
    clip=st.sampled_from([None, 1.0, 5.0]),
)
def test_vectorised_advantages_equal_the_loop_oracle(data, normalize_std, clip):
    """Random uneven groups, ids in any order and not contiguous."""
    group_ids = [g for g, _ in data]
    rewards = [r for _, r in data]
    got = group_advantages(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(group_ids),
        normalize_std=normalize_std,
        clip=clip,
    )
    expected = loop_group_advantages(rewards, group_ids, normalize_std=normalize_std, clip=clip)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_identical_rewards_never_count_as_mixed_even_when_float32_std_is_not_zero():
    value = 0.1 + 0.2
    identical = torch.full((7,), value, dtype=torch.float32)
    # The trap this guards against: a float32 std of identical values need not be 0.
    assert identical.std().item() > 0.0
    rewards = torch.cat([identical, torch.tensor([0.0, 1.0, 1.0])])
    ids = torch.tensor([0] * 7 + [1, 1, 1])
    assert effective_gradient_ratio(rewards, ids) == pytest.approx(0.3)
    assert group_advantages(rewards, ids)[:7].eq(0.0).all()


def test_effective_gradient_ratio_counts_responses_not_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    assert effective_gradient_ratio(rewards, ids) == pytest.approx(2 / 7)
    assert math.isnan(
        effective_gradient_ratio(torch.tensor([]), torch.tensor([], dtype=torch.long))
    )


# --- policy loss -------------------------------------------------------------------


def two_by_three_batch():
    """Row 0 (A=+1) has ratios 1, 1.5, 0.5; row 1 (A=-1) ratios 1, 4 and a padded token.

    Per-token loss: row 0 = [-1, -1.28 (clipped high), -0.5];
    row 1 = [1, 3 (4 capped by dual clip 3), masked].
    """
    old = torch.full((2, 3), -1.0)
    log_ratio = torch.tensor([[0.0, math.log(1.5), math.log(0.5)], [0.0, math.log(4.0), 5.0]])
    logprobs = (old + log_ratio).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logprobs, old, advantages, mask


@pytest.mark.parametrize(
    ("aggregation", "seq_sum_norm", "expected"),
    [
        ("token-mean", None, (-1 - 1.28 - 0.5 + 1 + 3) / 5),
        ("seq-mean-token-mean", None, ((-1 - 1.28 - 0.5) / 3 + (1 + 3) / 2) / 2),
        ("seq-mean-token-sum-norm", None, (-1 - 1.28 - 0.5 + 1 + 3) / 3),
        ("seq-mean-token-sum-norm", 10.0, (-1 - 1.28 - 0.5 + 1 + 3) / 10),
    ],
)
def test_policy_loss_matches_hand_computation(aggregation, seq_sum_norm, expected):
    logprobs, old, advantages, mask = two_by_three_batch()
    loss, info = policy_loss(
        logprobs, old, advantages, mask, aggregation=aggregation, seq_sum_norm=seq_sum_norm
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert info["pg_clipfrac"] == pytest.approx(1 / 5)
    assert info["pg_clipfrac_lower"] == pytest.approx(1 / 5)
    assert info["ratio_mean"] == pytest.approx((1 + 1.5 + 0.5 + 1 + 4) / 5, rel=1e-6)
    assert "kl_ref" not in info


def test_without_dual_clip_the_negative_advantage_loss_is_uncapped():
    logprobs, old, advantages, mask = two_by_three_batch()
    loss, info = policy_loss(logprobs, old, advantages, mask, dual_clip=None)
    assert loss.item() == pytest.approx((-1 - 1.28 - 0.5 + 1 + 4) / 5, abs=1e-6)
    assert info["pg_clipfrac_lower"] == 0.0


def test_ratio_one_gives_minus_mean_advantage_and_no_clipping():
    logprobs = torch.randn(4, 5)
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss, info = policy_loss(logprobs, logprobs.clone(), advantages, torch.ones(4, 5))
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-6)
    assert info["pg_clipfrac"] == 0.0
    assert info["ppo_kl"] == 0.0
    assert info["ratio_mean"] == pytest.approx(1.0)


def test_clip_fraction_counts_tokens_outside_the_range_in_the_advantage_direction():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[0.7, 0.9, 1.2, 1.4]])
    logprobs = ratios.log()
    _, pos = policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 4))
    _, neg = policy_loss(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 4), dual_clip=None)
    # A > 0 clips only ratio > 1.28; A < 0 clips only ratio < 0.8.
    assert pos["pg_clipfrac"] == pytest.approx(0.25)
    assert neg["pg_clipfrac"] == pytest.approx(0.25)


def test_k3_kl_is_zero_when_reference_equals_policy_and_positive_otherwise():
    logprobs = torch.randn(3, 4)
    old = logprobs.clone()
    adv = torch.tensor([1.0, 0.0, -1.0])
    mask = torch.ones(3, 4)
    base, _ = policy_loss(logprobs, old, adv, mask)
    same, info = policy_loss(logprobs, old, adv, mask, ref_logprobs=logprobs.clone(), kl_coef=0.5)
    assert info["kl_ref"] == 0.0
    assert same.item() == pytest.approx(base.item())
    shifted, info = policy_loss(logprobs, old, adv, mask, ref_logprobs=logprobs - 0.3, kl_coef=0.5)
    expected_kl = math.exp(-0.3) + 0.3 - 1
    assert info["kl_ref"] == pytest.approx(expected_kl, rel=1e-5)
    assert shifted.item() == pytest.approx(base.item() + 0.5 * expected_kl, rel=1e-5)
    assert (kl_k3(logprobs, logprobs + torch.randn(3, 4)) >= 0).all()


def test_k3_kl_is_capped_at_10_with_zero_gradient_beyond_the_cap_as_verl():
    """verl's low_var_kl: d = ref - logp clamped to [-20, 20], then exp(d) - d - 1
    clamped to [-10, 10]. Within the cap the gradient in logp is 1 - exp(d); beyond
    it (d > 2.61 or d < -11, and d = 50 past the log-ratio clamp) value 10, gradient 0."""
    d = [0.5, -0.5, 2.5, 3.0, -10.5, -12.0, 50.0]
    logprobs = torch.full((1, len(d)), -1.0, requires_grad=True)
    ref = logprobs.detach() + torch.tensor([d])
    kl = kl_k3(logprobs, ref)
    kl.sum().backward()
    k3 = [math.exp(x) - x - 1 for x in d[:3]] + [10.0, math.exp(-10.5) + 9.5, 10.0, 10.0]
    grad = [1 - math.exp(x) for x in d[:3]] + [0.0, 1 - math.exp(-10.5), 0.0, 0.0]
    torch.testing.assert_close(kl, torch.tensor([k3]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logprobs.grad, torch.tensor([grad]), rtol=1e-6, atol=1e-6)
    assert logprobs.grad[0, 3] == 0.0 and logprobs.grad[0, 5] == 0.0  # exactly, not small


def test_k3_kl_in_the_loss_adds_at_most_kl_coef_times_10_per_token():
    """A policy drifted far from the reference: the KL term is the cap, not exp(d)."""
    logprobs = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.zeros(2)
    loss, info = policy_loss(
        logprobs, logprobs.detach(), adv, mask, ref_logprobs=torch.full((2, 3), 8.0), kl_coef=0.5
    )
    assert info["kl_ref"] == pytest.approx(10.0)
    assert loss.item() == pytest.approx(5.0)
    loss.backward()
    assert torch.count_nonzero(logprobs.grad) == 0


def test_gradient_flows_only_through_logprobs():
    logprobs, old, advantages, mask = two_by_three_batch()
    old = old.clone().requires_grad_(True)
    advantages = advantages.clone().requires_grad_(True)
    ref = (logprobs.detach() - 0.1).requires_grad_(True)
    loss, _ = policy_loss(logprobs, old, advantages, mask, ref_logprobs=ref, kl_coef=0.1)
    loss.backward()
    assert logprobs.grad is not None and logprobs.grad.abs().sum() > 0
    assert old.grad is None and advantages.grad is None and ref.grad is None
    # Padded tokens get no gradient.
    assert logprobs.grad[1, 2] == 0.0


def test_aggregate_loss_ignores_fully_masked_sequences_in_seq_mean():
    loss_mat = torch.tensor([[2.0, 4.0], [100.0, 100.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-mean").item() == 3.0
    assert aggregate_loss(loss_mat, mask, "token-mean").item() == 3.0
    with pytest.raises(ValueError, match="unknown"):
        aggregate_loss(loss_mat, mask, "seq-sum")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "count"),
    [("token-mean", 5.0), ("seq-mean-token-mean", 2.0), ("seq-mean-token-sum-norm", 1.0)],
)
def test_aggregation_count_is_what_aggregate_loss_divides_by(mode, count):
    """Rows with tokens 3, 0 (an empty response) and 2: the means leave the empty row out."""
    loss_mat = torch.tensor([[1.0, 2.0, 3.0], [50.0, 50.0, 50.0], [4.0, 6.0, 70.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert aggregation_count(mask, mode).item() == count
    expected = {
        "token-mean": (1 + 2 + 3 + 4 + 6) / 5,
        "seq-mean-token-mean": (2.0 + 5.0) / 2,
        "seq-mean-token-sum-norm": (1 + 2 + 3 + 4 + 6) / 3,
    }[mode]
    assert aggregate_loss(loss_mat, mask, mode).item() == pytest.approx(expected)
    # Rows as parts weighted count(part) / count(all) add up to the whole.
    parts = sum(
        aggregate_loss(loss_mat[i : i + 1], mask[i : i + 1], mode, seq_sum_norm=3.0)
        * aggregation_count(mask[i : i + 1], mode)
        / count
        for i in range(3)
    )
    assert parts.item() == pytest.approx(expected)
    assert aggregate_loss(loss_mat, torch.zeros_like(mask), mode).item() == 0.0
    with pytest.raises(ValueError, match="unknown"):
        aggregation_count(mask, "seq-sum")  # type: ignore[arg-type]


def test_equal_group_weighting_matches_a_loop_over_groups():
    """Token-mean with advantages scaled by N_avg / n_g equals the loop oracle: each group's
    token losses times N_avg / n_g, summed, over all tokens; every group then carries the
    same total weight whatever its size."""
    torch.manual_seed(0)
    sizes = [2, 8, 30]
    group_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    rows, tokens = int(sum(sizes)), 5
    advantages = torch.randn(rows)
    logprobs = torch.randn(rows, tokens, requires_grad=True)
    old = logprobs.detach() + 0.1 * torch.randn(rows, tokens)
    mask = (torch.rand(rows, tokens) > 0.2).float()
    weights = group_loss_weights(group_ids, 8)
    assert torch.allclose(weights[group_ids == 1], torch.ones(8))
    assert torch.allclose(weights[:2], torch.full((2,), 4.0))
    loss, _ = policy_loss(logprobs, old, advantages * weights, mask, aggregation="token-mean")
    expected = torch.zeros(())
    for g, size in enumerate(sizes):
        rows_g = group_ids == g
        per_token, _ = policy_loss(
            logprobs[rows_g],
            old[rows_g],
            advantages[rows_g],
            mask[rows_g],
            aggregation="token-mean",
        )
        expected = expected + per_token * mask[rows_g].sum() * (8 / size)
    expected = expected / mask.sum()
    assert torch.allclose(loss, expected, atol=1e-6)
