"""The multi-process GRPO update (accelerate; DDP over gloo here, FSDP on GPUs).

Real worker processes and a real process group on 127.0.0.1. accelerate's FSDP
needs GPUs, so on this machine the group is data-parallel; the FSDP plugin path
has its own check for a GPU machine, `tests/gpu/test_cuda_update.py` (`make gpu-check`;
skipped without CUDA).
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal

import pytest
import torch

from pipeline_lib.config import TinyModelParams
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import build_char_tokenizer
from pipeline_lib.rollout.base import Completion
from pipeline_lib.update import LocalUpdater, UpdateSettings, build_update_batch
from pipeline_lib.update.distributed import AccelerateUpdateGroup, UpdateWorkerError

# The batch has 11 rows with signal: rank 0 takes 6, rank 1 takes 5. With 3 rows
# per micro-batch both ranks run 2 micro-batches.
SETTINGS = UpdateSettings(micro_batch_rows=3)


@pytest.fixture(scope="module")
def policy():
    tokenizer = build_char_tokenizer()
    config = TinyModelParams(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    return build_tiny_qwen2(tokenizer, config), tokenizer


def make_batch(model, tokenizer, rows=13, seed=1, token_limit=None):
    """Random prompts and completions of uneven lengths; two rows without signal."""
    generator = torch.Generator().manual_seed(seed)
    vocab = token_limit or model.config.vocab_size

    def tokens(low, high):
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(3, vocab, (length,), generator=generator).tolist()

    completions = []
    for index in range(rows):
        prompt, response = tokens(3, 9), tokens(1, 6)
        completions.append(
            Completion(index, prompt, response, [-1.0] * len(response), "", finished=True)
        )
    advantages = torch.randn(rows, generator=generator)
    advantages[[2, 5]] = 0
    return build_update_batch(completions, advantages, tokenizer.pad_token_id)


def assert_same_weights(a, b, atol):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=f"{name} differs")


# 5 rows per micro-batch: rank 0 runs 2 micro-batches, rank 1 runs 1 plus a
# zero-weight padding pass, so that both take part in the same collectives.
@pytest.mark.parametrize("micro_batch_rows", [3, 5])
def test_two_ranks_match_the_single_process_update(policy, micro_batch_rows):
    model, tokenizer = policy
    settings = UpdateSettings(micro_batch_rows=micro_batch_rows)
    batch = make_batch(model, tokenizer)
    local_model, group_model = copy.deepcopy(model), copy.deepcopy(model)
    local = LocalUpdater(local_model, learning_rate=1e-3, settings=settings)
    local_stats = [local.update(batch), local.update(batch)]
    with contextlib.closing(
        AccelerateUpdateGroup(group_model, num_processes=2, learning_rate=1e-3, settings=settings)
    ) as group:
        assert group.parallelism == "MULTI_CPU"  # accelerate's DDP: its FSDP needs GPUs
        group_stats = [group.update(batch), group.update(batch)]

    # The loop's copy of the policy received the group's weights after each update.
    assert not torch.equal(group_model.lm_head.weight, model.lm_head.weight)
    assert_same_weights(local_model, group_model, atol=1e-5)
    for expected, got in zip(local_stats, group_stats, strict=True):
        assert got["train/rows_with_signal"] == expected["train/rows_with_signal"] == 11
        for key in ("train/loss", "train/grad_norm", "train/pg_loss", "rollout/logprob_abs_diff"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_optimizer_state_round_trip_continues_the_same_run(policy):
    """What a checkpoint holds (weights + gathered AdamW state) resumes exactly."""
    model, tokenizer = policy
    first, second = make_batch(model, tokenizer, seed=1), make_batch(model, tokenizer, seed=2)
    straight = copy.deepcopy(model)
    with contextlib.closing(
        AccelerateUpdateGroup(straight, num_processes=2, learning_rate=1e-3, settings=SETTINGS)
    ) as group:
        group.update(first)
        checkpoint_weights = copy.deepcopy(straight)
        optimizer_state = group.optimizer_state_dict()
        group.update(second)

    assert set(optimizer_state["state"]) == {name for name, _ in model.named_parameters()}
    assert all(int(entry["step"]) == 1 for entry in optimizer_state["state"].values())
    resumed = checkpoint_weights
    with contextlib.closing(
        AccelerateUpdateGroup(resumed, num_processes=2, learning_rate=1e-3, settings=SETTINGS)
    ) as group:
        group.load_optimizer_state_dict(optimizer_state)
        group.update(second)
    assert_same_weights(straight, resumed, atol=1e-6)


def test_batch_without_signal_leaves_weights_alone(policy):
    model, tokenizer = policy
    batch = make_batch(model, tokenizer)
    batch.advantages.zero_()
    copy_ = copy.deepcopy(model)
    with contextlib.closing(
        AccelerateUpdateGroup(copy_, num_processes=2, learning_rate=1e-3, settings=SETTINGS)
    ) as g:
        stats = g.update(batch)
    assert stats["train/rows_with_signal"] == 0
    assert_same_weights(model, copy_, atol=0)


def test_failing_worker_raises_with_its_traceback_and_stops_the_group(policy):
    model, tokenizer = policy
    # Token ids past the vocabulary: the embedding lookup fails inside the workers.
    bad = make_batch(model, tokenizer, token_limit=model.config.vocab_size + 50, seed=3)
    group = AccelerateUpdateGroup(
        copy.deepcopy(model), num_processes=2, learning_rate=1e-3, settings=SETTINGS
    )
    workers = list(group._workers)
    with pytest.raises(UpdateWorkerError, match=r"rank \d failed:(.|\n)*IndexError"):
        group.update(bad)
    assert not any(worker.is_alive() for worker in workers)
    with pytest.raises(RuntimeError, match="closed"):
        group.update(make_batch(model, tokenizer))


def test_dead_worker_is_reported_not_waited_for(policy):
    model, tokenizer = policy
    group = AccelerateUpdateGroup(
        copy.deepcopy(model), num_processes=2, learning_rate=1e-3, settings=SETTINGS
    )
    workers = list(group._workers)
    os.kill(workers[1].pid, signal.SIGKILL)
    workers[1].join()
    with pytest.raises(UpdateWorkerError, match=r"rank 1 died \(exit code -9\)"):
        group.update(make_batch(model, tokenizer))
    assert not any(worker.is_alive() for worker in workers)


def test_open_updater_picks_the_process_count(policy):
    from pipeline_lib.config import TrainConfig
    from tasks.train import open_updater

    model, _ = policy
    assert isinstance(open_updater(model, TrainConfig(update_processes=1)), LocalUpdater)
    with pytest.raises(ValueError, match="at least 1"):
        AccelerateUpdateGroup(model, num_processes=0, learning_rate=1e-3, settings=SETTINGS)
