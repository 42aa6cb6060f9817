"""`RolloutEngine` on transformers `generate`, for machines without vLLM.

Slower than vLLM on real models but dependency-free, and the faster of the two for
the embedded tiny policy; also the reference the vLLM engine is tested against.
Per-prompt n is served by repeating prompt rows; prompts of different lengths are
left-padded so that generation starts in one column. Like vLLM's prefix cache, the
rows of one prompt share its prefill: the prompt is run through the model once and
its KV cache copied to each of its rows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Self

import torch
import transformers

from pipeline_lib.rollout.base import (
    Completion,
    GenerationStats,
    SamplingConfig,
    check_generate_args,
)


class HFGenerateEngine:
    """Samples with `model.generate`; weights are the model's own parameters."""

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        *,
        max_batch_rows: int = 512,
    ) -> None:
        """Wrap `model` (used in place, on its own device) and its `tokenizer`.

        `max_batch_rows` bounds the completions generated in one `generate` call,
        which bounds memory (rows x (prompt + max_new_tokens) x vocab scores).
        """
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        self._model: transformers.PreTrainedModel | None = model
        self._tokenizer = tokenizer
        self._eos_token_id: int = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self._pad_token_id: int = self._eos_token_id if pad is None else pad
        self._max_batch_rows = max_batch_rows
        self._last_stats: GenerationStats | None = None

    @property
    def last_stats(self) -> GenerationStats | None:
        return self._last_stats

    def generate(
        self,
        prompt_token_ids: Sequence[list[int]],
        n_per_prompt: Sequence[int],
        sampling: SamplingConfig,
    ) -> list[list[Completion]]:
        """Sample `n_per_prompt[i]` completions of each prompt."""
        check_generate_args(prompt_token_ids, n_per_prompt)
        model = self._require_open()
        rows = [i for i, n in enumerate(n_per_prompt) for _ in range(n)]
        results: list[list[Completion]] = [[] for _ in prompt_token_ids]
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with self._seeded(sampling.seed, model.device):
                for start in range(0, len(rows), self._max_batch_rows):
                    batch = rows[start : start + self._max_batch_rows]
                    prompts = [list(prompt_token_ids[i]) for i in batch]
                    for completion in self._generate_rows(batch, prompts, sampling):
                        results[completion.prompt_index].append(completion)
        finally:
            model.train(was_training)
        self._last_stats = GenerationStats(
            num_completions=len(rows),
            num_generated_tokens=sum(len(c.token_ids) for group in results for c in group),
            seconds=time.perf_counter() - started,
        )
        return results

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy `state_dict` into the wrapped model's parameters."""
        self._require_open().load_state_dict(state_dict)

    def close(self) -> None:
        self._model = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @torch.no_grad()
    def _generate_rows(
        self, prompt_indices: list[int], prompts: list[list[int]], sampling: SamplingConfig
    ) -> list[Completion]:
        """Generate one completion per row (prompt `prompt_indices[r]` is `prompts[r]`)."""
        model = self._require_open()
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self._pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=self._prompt_cache(model, input_ids, attention_mask, prompt_indices),
            generation_config=self._generation_config(sampling),
        )
        new_tokens = output.sequences[:, width:].cpu()  # (rows, steps)
        # Scores are the logits after the sampling processors (temperature, top-p),
        # so their log-softmax is the distribution each token was sampled from.
        scores = torch.stack(output.scores, dim=1).float()  # (rows, steps, vocab)
        logprobs = (
            (scores.log_softmax(dim=-1).gather(-1, new_tokens.to(scores.device).unsqueeze(-1)))
            .squeeze(-1)
            .cpu()
        )  # (rows, steps)
        completions = []
        for row, (index, prompt) in enumerate(zip(prompt_indices, prompts, strict=True)):
            tokens = new_tokens[row].tolist()
            finished = self._eos_token_id in tokens
            # Rows that stop early are padded to the batch's length: cut after EOS.
            length = tokens.index(self._eos_token_id) + 1 if finished else len(tokens)
            completions.append(
                Completion(
                    prompt_index=index,
                    prompt_token_ids=prompt,
                    token_ids=tokens[:length],
                    logprobs=logprobs[row, :length].tolist(),
                    text=self._tokenizer.decode(tokens[:length], skip_special_tokens=True),
                    finished=finished,
                )
            )
        return completions

    @staticmethod
    def _prompt_cache(
        model: transformers.PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_indices: list[int],
    ) -> transformers.DynamicCache | None:
        """KV cache of every row's prompt but its last token, computed once per distinct
        prompt and copied to that prompt's rows; None when no prompt has two rows.

        `generate` then runs only the last prompt column and the new tokens. Positions
        are generate's own (from the attention mask, 0 on padding), so the cached
        prefix is the one generate would have computed itself.
        """
        rows_prompt = torch.tensor(prompt_indices)
        distinct, row_to_distinct = torch.unique(rows_prompt, return_inverse=True)
        if input_ids.shape[1] < 2 or len(distinct) == len(prompt_indices):
            return None
        # One row per distinct prompt: the first row that holds it.
        first_row = torch.full((len(distinct),), len(prompt_indices), dtype=torch.long)
        first_row.scatter_reduce_(0, row_to_distinct, torch.arange(len(prompt_indices)), "amin")
        ids, mask = input_ids[first_row, :-1], attention_mask[first_row, :-1]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = transformers.DynamicCache(config=model.config)
        model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        cache.batch_select_indices(row_to_distinct.to(input_ids.device))
        return cache

    def _generation_config(self, sampling: SamplingConfig) -> transformers.GenerationConfig:
        # Every sampling knob is set explicitly: unset ones would be filled from the
        # model's generation_config.json and then transformers' defaults (top_k=50),
        # which vLLM does not apply.
        common = {
            "max_new_tokens": sampling.max_new_tokens,
            "eos_token_id": self._eos_token_id,
            "pad_token_id": self._pad_token_id,
            "return_dict_in_generate": True,
            "output_scores": True,
            "num_beams": 1,
            "repetition_penalty": 1.0,
        }
        if sampling.temperature == 0:
            return transformers.GenerationConfig(do_sample=False, **common)
        return transformers.GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            **common,
        )

    @staticmethod
    @contextlib.contextmanager
    def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
        """Seed sampling for the block without disturbing the caller's RNG state."""
        if seed is None:
            yield
            return
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _require_open(self) -> transformers.PreTrainedModel:
        if self._model is None:
            raise RuntimeError("the engine is closed")
        return self._model
