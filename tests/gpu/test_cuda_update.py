"""The GRPO update paths on a CUDA device (`make gpu-check`; skipped without CUDA).

A tiny Qwen2 policy and two random GRPO batches (tests/test_distributed_update.py's
helpers); the weights after two updates on the CPU are the reference for: one CUDA
device in this process (`LocalUpdater`), and a one-process `AccelerateUpdateGroup` on
CUDA, which accelerate runs as FSDP2. The group's gathered AdamW state must resume
exactly, and the HF rollout engine must sample on CUDA.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from pipeline_lib.config import TinyModelParams
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import build_char_tokenizer
from pipeline_lib.rollout.base import SamplingConfig
from pipeline_lib.rollout.hf_engine import HFGenerateEngine
from pipeline_lib.update import LocalUpdater, UpdateSettings
from pipeline_lib.update.distributed import AccelerateUpdateGroup
from tests.test_distributed_update import assert_same_weights, make_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SETTINGS = UpdateSettings(micro_batch_rows=16)
LEARNING_RATE = 1e-3


@pytest.fixture(scope="module", autouse=True)
def full_float32_matmuls():
    """No TF32 on either device, so the comparisons measure our code, not the matmul mode."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def policy():
    tokenizer = build_char_tokenizer()
    config = TinyModelParams(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512)
    return build_tiny_qwen2(tokenizer, config), tokenizer


@pytest.fixture(scope="module")
def batches(policy):
    model, tokenizer = policy
    return [make_batch(model, tokenizer, rows=96, seed=seed) for seed in (1, 2)]


def local_updates(model, batches, device: str) -> torch.nn.Module:
    """A copy of `model` on `device` after one `LocalUpdater` step per batch."""
    updated = copy.deepcopy(model).to(device)
    updater = LocalUpdater(updated, learning_rate=LEARNING_RATE, settings=SETTINGS)
    for batch in batches:
        updater.update(batch)
    return updated


@pytest.fixture(scope="module")
def cpu_reference(policy, batches):
    return local_updates(policy[0], batches, "cpu")


def on_cpu(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).cpu()


def test_cuda_local_update_matches_the_cpu_update(policy, batches, cpu_reference):
    cuda_model = local_updates(policy[0], batches, "cuda")
    assert_same_weights(on_cpu(cuda_model), cpu_reference, atol=1e-4)


def test_one_process_group_runs_fsdp_matches_the_cpu_and_resumes_exactly(
    policy, batches, cpu_reference
):
    fsdp_model = copy.deepcopy(policy[0])
    with contextlib.closing(
        AccelerateUpdateGroup(
            fsdp_model, num_processes=1, learning_rate=LEARNING_RATE, settings=SETTINGS
        )
    ) as group:
        assert group.parallelism == "FSDP"
        group.update(batches[0])
        checkpoint_model = copy.deepcopy(fsdp_model)
        optimizer_state = group.optimizer_state_dict()
        group.update(batches[1])
    assert_same_weights(on_cpu(fsdp_model), cpu_reference, atol=1e-4)

    with contextlib.closing(
        AccelerateUpdateGroup(
            checkpoint_model, num_processes=1, learning_rate=LEARNING_RATE, settings=SETTINGS
        )
    ) as group:
        group.load_optimizer_state_dict(optimizer_state)
        group.update(batches[1])
    assert_same_weights(on_cpu(checkpoint_model), on_cpu(fsdp_model), atol=1e-6)


def test_hf_engine_samples_on_cuda(policy):
    model, tokenizer = policy
    engine = HFGenerateEngine(copy.deepcopy(model).to("cuda"), tokenizer)
    prompts = [tokenizer("12+7=", add_special_tokens=False)["input_ids"]] * 4
    groups = engine.generate(prompts, [3] * 4, SamplingConfig(max_new_tokens=6, seed=0))
    assert sum(len(group) for group in groups) == 12
    print(f"HF generate on CUDA: {engine.last_stats.tokens_per_second:.0f} tokens/s")
