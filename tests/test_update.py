"""The update core where its risk is: the response-mask offset and micro-batch loss weights."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pipeline_lib.config import TinyModelParams
from pipeline_lib.grpo import policy_loss
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import build_char_tokenizer
from pipeline_lib.rollout.base import Completion
from pipeline_lib.update.core import (
    BatchNorms,
    UpdateSettings,
    backward_rows,
    build_update_batch,
    mini_batches,
    response_logprobs,
    signal_rows,
    tis_weights,
    token_logprobs,
)
from pipeline_lib.update.local import LocalUpdater, grpo_update

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def completion(prompt: list[int], tokens: list[int], logprob: float = -1.0) -> Completion:
    return Completion(0, prompt, tokens, [logprob] * len(tokens), "", True)


def test_response_mask_marks_the_positions_that_predict_response_tokens():
    """Target position t predicts token t + 1: response tokens sit at prompt_len - 1 ...."""
    rows = [completion([5, 6, 7], [8, 9], -0.5), completion([5], [10, 11, 12], -0.25)]
    batch = build_update_batch(rows, torch.tensor([1.0, -1.0]), pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 10, 11, 12, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    # The masked targets are exactly the response tokens, in order.
    targets = batch.input_ids[:, 1:]
    assert targets[0][batch.response_mask[0].bool()].tolist() == [8, 9]
    assert targets[1][batch.response_mask[1].bool()].tolist() == [10, 11, 12]
    assert batch.sampled_logprobs.tolist() == [[0, 0, -0.5, -0.5], [-0.25, -0.25, -0.25, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_token_logprobs_score_the_next_token():
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=1), seed=0).eval()
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        got = token_logprobs(model, ids, torch.ones_like(ids))
        logits = model(input_ids=ids).logits[0]
    expected = [torch.log_softmax(logits[t], -1)[ids[0, t + 1]].item() for t in range(3)]
    torch.testing.assert_close(got[0], torch.tensor(expected))


@pytest.fixture(scope="module")
def policy_and_batch():
    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer, TinyModelParams(num_layers=1, hidden_size=32), seed=0)
    generator = torch.Generator().manual_seed(0)
    # Three prompts of uneven lengths, shared by rows 0/3/6, 1/4 and 2/5 as GRPO's
    # groups share theirs; uneven response lengths.
    prompts = [torch.randint(3, 18, (2 + p,), generator=generator).tolist() for p in range(3)]
    rows = []
    for row in range(7):
        prompt = prompts[row % 3]
        tokens = torch.randint(3, 18, (1 + (row * 5) % 4,), generator=generator).tolist()
        rows.append(completion(prompt, tokens))
    advantages = torch.tensor([1.0, -0.5, 0.0, 2.0, 0.0, -1.5, 0.7])
    return model, build_update_batch(rows, advantages, tokenizer.pad_token_id)


def test_response_logprobs_run_each_prompt_once_and_match_the_full_rows(policy_and_batch):
    """Shared-prompt scoring (prompt once per distinct prompt, responses against its
    cache) gives the full-row logprobs and gradients at every response target."""
    model, batch = policy_and_batch
    rows = torch.tensor([6, 0, 2, 4, 1])  # any order, prompts repeated and not
    full_model, shared_model = copy.deepcopy(model), copy.deepcopy(model)
    full = token_logprobs(full_model, batch.input_ids[rows], batch.attention_mask[rows])
    shared = response_logprobs(shared_model, batch, rows)
    mask = batch.response_mask[rows]
    torch.testing.assert_close(shared * mask, full * mask, rtol=1e-5, atol=1e-6)
    assert torch.all(shared[mask == 0] == 0)  # prompt targets and padding: not scored
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask
    (full * weights).sum().backward()
    (shared * weights).sum().backward()
    for (name, a), b in zip(full_model.named_parameters(), shared_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def _gradients(model, batch, settings, micro_batch_rows, world=1):
    """`backward_rows` gradients and diagnostic sums, the rows split over `world`
    ranks as `distributed` splits them (the ranks' gradients summed)."""
    model = copy.deepcopy(model).train()
    settings = UpdateSettings(
        loss_aggregation=settings.loss_aggregation, micro_batch_rows=micro_batch_rows
    )
    rows = signal_rows(batch, settings)
    norms = BatchNorms.of(batch, rows, settings)
    totals: dict[str, float] = {}
    for rank in range(world):
        for key, value in backward_rows(model, batch, rows[rank::world], settings, norms).items():
            totals[key] = totals.get(key, 0.0) + value
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in model.named_parameters()
    }
    return grads, totals


def _full_batch_loss(model, batch, aggregation):
    """The reference: `policy_loss` over every row in one pass, and its gradients."""
    settings = UpdateSettings(loss_aggregation=aggregation)
    reference = copy.deepcopy(model).train()
    logprobs = token_logprobs(reference, batch.input_ids, batch.attention_mask)
    loss, _ = policy_loss(
        logprobs,
        logprobs.detach(),
        batch.advantages,
        batch.response_mask,
        aggregation=aggregation,
        seq_sum_norm=float(settings.max_new_tokens),  # a constant, not the padded width
    )
    loss.backward()
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad
        for n, p in reference.named_parameters()
    }
    return float(loss.detach()), grads


def _assert_split_gradients_equal_the_full_batch(model, batch, aggregation, splits):
    loss, expected = _full_batch_loss(model, batch, aggregation)
    for micro, world in splits:
        settings = UpdateSettings(loss_aggregation=aggregation)
        grads, totals = _gradients(model, batch, settings, micro, world)
        assert totals["train/loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7), (micro, world)
        for name, gradient in expected.items():
            torch.testing.assert_close(
                grads[name], gradient, rtol=1e-4, atol=1e-7, msg=f"{name} {micro=} {world=}"
            )


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batches_and_skipped_zero_rows_give_the_full_batch_gradient(
    policy_and_batch, aggregation
):
    """Rows split 1, 2 or 3 to a micro-batch, zero-advantage rows left out, and the
    gradient still equals that of `policy_loss` over the whole batch at once."""
    model, batch = policy_and_batch
    _assert_split_gradients_equal_the_full_batch(
        model, batch, aggregation, [(1, 1), (2, 1), (3, 1)]
    )


@pytest.fixture(scope="module")
def policy_and_batch_with_empty_responses(policy_and_batch):
    """The fixture's prompts and model; rows 1 and 6 (advantage != 0) and 4 (advantage
    0) have empty responses, so signal rows [0, 1, 3, 5, 6] in pairs end on an empty one."""
    model, batch = policy_and_batch
    lengths = [2, 0, 3, 1, 0, 4, 0]
    generator = torch.Generator().manual_seed(1)
    rows = []
    for row, length in enumerate(lengths):
        prompt = batch.input_ids[row, : batch.prompt_lengths[row]].tolist()
        rows.append(
            completion(prompt, torch.randint(3, 18, (length,), generator=generator).tolist())
        )
    return model, build_update_batch(rows, batch.advantages, pad_token_id=0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_responses_count_in_micro_batch_weights_as_the_loss_counts_them(
    policy_and_batch_with_empty_responses, aggregation
):
    """Completions with no response token, in micro-batches of 1, 2, 3, 4 or all rows
    and split over 2 or 3 ranks: the gradient is the full batch's, whose
    seq-mean-token-mean leaves empty responses out of its mean."""
    model, batch = policy_and_batch_with_empty_responses
    assert batch.response_mask.sum(-1).tolist() == [2, 0, 3, 1, 0, 4, 0]
    splits = [(1, 1), (2, 1), (3, 1), (4, 1), (batch.rows, 1), (1, 2), (2, 3)]
    _assert_split_gradients_equal_the_full_batch(model, batch, aggregation, splits)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_a_step_of_only_empty_responses_has_zero_loss_and_gradient(policy_and_batch, aggregation):
    model, batch = policy_and_batch
    prompts = [batch.input_ids[row, : batch.prompt_lengths[row]].tolist() for row in range(3)]
    empty = build_update_batch(
        [completion(prompt, []) for prompt in prompts], torch.tensor([1.0, -1.0, 0.5]), 0
    )
    grads, totals = _gradients(model, empty, UpdateSettings(loss_aggregation=aggregation), 2)
    assert totals["train/loss"] == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_signal_rows_skip_zero_advantages_unless_a_kl_term_needs_every_row(policy_and_batch):
    _, batch = policy_and_batch
    assert signal_rows(batch, UpdateSettings()).tolist() == [0, 1, 3, 5, 6]
    assert signal_rows(batch, UpdateSettings(kl_coef=0.1)).tolist() == list(range(7))


def test_seq_sum_norm_is_max_new_tokens_whatever_the_padded_width(policy_and_batch):
    _, batch = policy_and_batch
    settings = UpdateSettings(max_new_tokens=16)
    rows = signal_rows(batch, settings)
    assert batch.response_mask.shape[1] != 16
    assert BatchNorms.of(batch, rows, settings).seq_norm == 16.0


def _update(model, batch, lr=0.5, reference=None, **settings):
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    stats = grpo_update(model, optimizer, batch, UpdateSettings(**settings), reference)
    return model, stats


def _weights_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_one_mini_batch_and_epoch_is_the_plain_update_and_hides_constant_diagnostics(
    policy_and_batch,
):
    model, batch = policy_and_batch
    plain, stats = _update(model, batch)
    explicit, _ = _update(model, batch, ppo_mini_batches=1, ppo_epochs=1)
    assert _weights_equal(plain, explicit)
    assert stats["train/optimizer_steps"] == 1
    assert "train/ratio_mean" not in stats and "train/pg_clipfrac" not in stats


def test_clipping_acts_on_the_second_mini_batch_after_a_large_step(policy_and_batch):
    """Two steps over the same rows: the second sees ratios far from 1, and the clip
    range changes its gradient (with an unbounded range the weights differ)."""
    model, batch = policy_and_batch
    clipped, stats = _update(model, batch, lr=2.0, ppo_epochs=2)
    unclipped, loose = _update(model, batch, lr=2.0, ppo_epochs=2, clip_low=0.99, clip_high=1e9)
    assert stats["train/optimizer_steps"] == 2
    assert stats["train/pg_clipfrac"] > 0 and loose["train/pg_clipfrac"] == 0
    assert stats["train/ppo_kl"] != 0
    assert not _weights_equal(clipped, unclipped)
    one_step, _ = _update(model, batch, lr=2.0)
    one_loose, _ = _update(model, batch, lr=2.0, clip_low=0.99, clip_high=1e9)
    assert _weights_equal(one_step, one_loose)  # one step: the clip cannot act


def test_mini_batches_shuffle_the_rows_across_groups_in_each_pass(policy_and_batch):
    """Several mini-batches: every pass covers each row once, in a seeded order that mixes
    the groups (a prompt's rows do not stay together) and differs between passes."""
    _, batch = policy_and_batch
    settings = UpdateSettings(ppo_mini_batches=3, ppo_epochs=2)
    parts = mini_batches(batch, settings)
    assert [len(p) for p in parts] == [3, 2, 2, 3, 2, 2]
    first, second = torch.cat(parts[:3]), torch.cat(parts[3:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(batch.rows))
    assert first.tolist() != list(range(batch.rows)) and first.tolist() != second.tolist()
    again = mini_batches(batch, settings)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))  # seeded
    other = mini_batches(dataclasses.replace(batch, shuffle_seed=1), settings)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other, strict=True))


def test_one_mini_batch_keeps_the_rows_in_order_so_the_full_batch_gradient(policy_and_batch):
    """With one optimizer step the shuffle is skipped: the update is exactly the full-batch
    step whatever the shuffle seed."""
    model, batch = policy_and_batch
    assert [p.tolist() for p in mini_batches(batch, UpdateSettings(ppo_epochs=2))] == [
        list(range(batch.rows))
    ] * 2
    first, _ = _update(model, dataclasses.replace(batch, shuffle_seed=0))
    second, _ = _update(model, dataclasses.replace(batch, shuffle_seed=7))
    assert _weights_equal(first, second)


def test_truncated_importance_weights_act_per_token_and_vanish_on_policy(policy_and_batch):
    model, batch = policy_and_batch
    with torch.no_grad():
        exact = token_logprobs(model, batch.input_ids, batch.attention_mask)
    on_policy = dataclasses.replace(batch, sampled_logprobs=exact)
    off_policy = dataclasses.replace(batch, sampled_logprobs=exact + 0.7)  # engine more sure
    plain, _ = _update(model, on_policy)
    same, _ = _update(model, on_policy, tis_cap=2.0)
    weighted, _ = _update(model, off_policy, tis_cap=2.0)
    for a, b in zip(plain.parameters(), same.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not _weights_equal(plain, weighted)
    weights = tis_weights(exact, exact - 3.0, cap=2.0)
    assert weights.max() == 2.0  # the cap bounds pi_trainer / pi_engine = e^3


def test_kl_term_pulls_the_policy_back_to_the_reference(policy_and_batch):
    """Zero advantages: the only gradient is the KL to the reference, which shrinks."""
    model, batch = policy_and_batch
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    drifted = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in drifted.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    no_signal = dataclasses.replace(batch, advantages=torch.zeros(batch.rows))
    kls = []
    for _ in range(3):
        drifted, stats = _update(drifted, no_signal, lr=0.05, reference=reference, kl_coef=1.0)
        kls.append(stats["train/kl_ref"])
    assert stats["train/rows_with_signal"] == batch.rows  # the KL needs every row
    assert kls[0] > kls[1] > kls[2] > 0
    with pytest.raises(ValueError, match="reference"):
        LocalUpdater(model, learning_rate=1e-3, settings=UpdateSettings(kl_coef=0.1))
