"""Prompt rows -> token ids, the same way for training, evaluation and every engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import transformers

PromptTemplate = Literal["raw", "chat"]


def encode_prompts(
    tokenizer: transformers.PreTrainedTokenizerBase,
    problems: Sequence[str],
    template: PromptTemplate = "raw",
    instruction: str = "",
) -> list[list[int]]:
    """Token ids of each problem.

    'raw' encodes the text as is, with no special tokens (the embedded arithmetic
    policy completes "  12+ 345=" directly). 'chat' wraps problem and instruction
    in a user turn of the tokenizer's chat template and opens the assistant turn.
    """
    if template == "raw":
        return [tokenizer.encode(p, add_special_tokens=False) for p in problems]
    if template == "chat":
        if not tokenizer.chat_template:
            raise ValueError("prompt_template 'chat' needs a tokenizer with a chat template")
        encoded = []
        for problem in problems:
            content = f"{problem}\n{instruction}".strip()
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                add_generation_prompt=True,
                tokenize=True,
            )
            # transformers 5 returns a BatchEncoding here; older versions a list.
            encoded.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        return encoded
    raise ValueError(f"unknown prompt_template {template!r}: use 'raw' or 'chat'")


@dataclass(frozen=True)
class PromptSet:
    """Prompts ready for the engine: ids, token ids and reference answers, aligned."""

    ids: list[str]
    token_ids: list[list[int]]
    answers: list[str]

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.token_ids) == len(self.answers)):
            raise ValueError("ids, token_ids and answers must have the same length")

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, count: int) -> PromptSet:
        """The first `count` prompts."""
        return PromptSet(self.ids[:count], self.token_ids[:count], self.answers[:count])
