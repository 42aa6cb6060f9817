"""Fixtures for integration tests of the rollout engines.

One vLLM engine per test session (start-up costs 30-65 s on 2 CPU cores); every
test gets it back with the base weights loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from pipeline_lib.config import TinyModelParams
from pipeline_lib.policy.checkpoint import save_policy
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.policy.tokenizer import build_char_tokenizer
from pipeline_lib.rollout.base import RolloutEngine

ROLLOUT_MODEL_CONFIG = TinyModelParams()


@pytest.fixture(scope="session")
def rollout_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def rollout_base_state(
    rollout_tokenizer: transformers.PreTrainedTokenizerFast,
) -> dict[str, torch.Tensor]:
    """Weights of the tiny random policy every engine starts from (a private copy)."""
    model = build_tiny_qwen2(rollout_tokenizer, ROLLOUT_MODEL_CONFIG)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="session")
def rollout_model_dir(
    tmp_path_factory: pytest.TempPathFactory,
    rollout_tokenizer: transformers.PreTrainedTokenizerFast,
) -> Path:
    model = build_tiny_qwen2(rollout_tokenizer, ROLLOUT_MODEL_CONFIG)
    return save_policy(model, rollout_tokenizer, tmp_path_factory.mktemp("rollout") / "policy")


@pytest.fixture(scope="session")
def session_vllm_engine(rollout_model_dir: Path) -> Iterator[RolloutEngine]:
    pytest.importorskip("vllm")
    from pipeline_lib.rollout.vllm_engine import VLLMEngine

    with VLLMEngine(str(rollout_model_dir), seed=0, max_model_len=64) as engine:
        yield engine


@pytest.fixture(scope="session")
def session_hf_engine(
    rollout_tokenizer: transformers.PreTrainedTokenizerFast,
) -> Iterator[RolloutEngine]:
    from pipeline_lib.rollout.hf_engine import HFGenerateEngine

    model = build_tiny_qwen2(rollout_tokenizer, ROLLOUT_MODEL_CONFIG)
    with HFGenerateEngine(model, rollout_tokenizer) as engine:
        yield engine


@pytest.fixture(params=["vllm", "hf"])
def rollout_engine(
    request: pytest.FixtureRequest, rollout_base_state: dict[str, torch.Tensor]
) -> RolloutEngine:
    """Each engine in turn, holding the base weights (tests may change them)."""
    engine: RolloutEngine = request.getfixturevalue(f"session_{request.param}_engine")
    engine.update_weights(rollout_base_state)
    return engine
