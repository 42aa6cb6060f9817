"""Weight sync into a running vLLM engine: a worker extension plus the wire format.

vLLM mixes `WeightSyncExtension` into each of its workers (by qualified name, via
`LLM(worker_extension_cls=...)`), so the engine side can call
`llm.collective_rpc("load_state_dict_bytes", args=(payload,))`. The state dict
travels as safetensors bytes: the engine core runs in another process, and bytes
survive vLLM's RPC serialisation where tensors would not be guaranteed to.

Why `reload_weights` and not `model.load_weights`: on CPU vLLM repacks linear
weights after loading (oneDNN / packed GEMM), so writing the checkpoint tensors
in place leaves the kernels reading stale packed copies and plain `load_weights`
fails; `reload_weights` re-runs that post-processing layer by layer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

WORKER_EXTENSION = "pipeline_lib.rollout.weight_sync.WeightSyncExtension"
"""Qualified name to pass as `worker_extension_cls`."""


def serialize_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Encode a state dict as safetensors bytes (CPU, contiguous, detached).

    Tensors that share storage (tied embeddings: `lm_head.weight` is
    `model.embed_tokens.weight`) are copied, as safetensors refuses shared memory.
    """
    seen_storages: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return save_safetensors(tensors)


class WeightSyncExtension:
    """Mixed into vLLM's worker class; `self` is the worker (it has `model_runner`).

    Attribute names must not clash with the worker's own (vLLM asserts this).
    """

    model_runner: object  # provided by the vLLM worker this class is mixed into

    def load_state_dict_bytes(self, payload: bytes) -> int:
        """Load a safetensors-encoded state dict (checkpoint names) in place.

        Returns the number of tensors received. The caller must reset the prefix
        cache afterwards: cached KV blocks were computed with the old weights.
        """
        _quiet_rotary_reload_warning()
        state_dict = load_safetensors(payload)
        self.model_runner.reload_weights(  # type: ignore[attr-defined]
            weights_iterator=iter(state_dict.items()), is_checkpoint_format=True
        )
        self._retie_output_embeddings()
        return len(state_dict)

    def _retie_output_embeddings(self) -> None:
        """Point `lm_head` at the input embeddings again and redo its post-processing.

        With tied embeddings vLLM skips `lm_head.weight` when loading. Where the CPU
        output layer multiplies with a packed copy made at start-up (the AMX
        `weight_packed_linear` path for bfloat16/float16), it would silently keep
        computing logits from the old embeddings. Elsewhere (oneDNN on AVX-512, GPU)
        the tie already holds and this is a cheap no-op.
        """
        runner = self.model_runner
        hf_config = runner.model_config.hf_text_config  # type: ignore[attr-defined]
        if not getattr(hf_config, "tie_word_embeddings", False):
            return
        found = _find_embeddings(runner.get_model())  # type: ignore[attr-defined]
        if found is None:
            return  # not the last pipeline stage, or an architecture without lm_head
        embedding, lm_head = found
        lm_head.weight = embedding.weight
        lm_head.quant_method.process_weights_after_loading(lm_head)

    def output_layer_matches_embeddings(self) -> bool:
        """Whether the output layer computes with the current input embeddings.

        A diagnostic for tied models: applies `lm_head` (through its kernels, packed
        or not) to a few random hidden states and compares with a plain matmul by
        the embedding matrix. Cheap at any model size (4 rows).
        """
        found = _find_embeddings(self.model_runner.get_model())  # type: ignore[attr-defined]
        if found is None:
            raise RuntimeError("this model has no lm_head and input embedding pair")
        embedding, lm_head = found
        weight = embedding.weight
        generator = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn(4, weight.shape[1], generator=generator).to(weight)
        with torch.no_grad():
            expected = hidden.float() @ weight.float().T  # (4, vocab)
            actual = lm_head.quant_method.apply(lm_head, hidden).float()
        actual = actual[:, : expected.shape[1]]  # the output layer may pad the vocabulary
        # Relative to the logits' scale, so bfloat16 engines pass too.
        error = (actual - expected).abs().max()
        return bool(error <= 2e-2 * expected.abs().max())


_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights", printed at every sync.

    Rotary tables are computed at start-up, never stored in a checkpoint, and vLLM
    puts them back unchanged: nothing failed. Warnings about other layers still show.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


def _quiet_rotary_reload_warning() -> None:
    logger = logging.getLogger(_RELOAD_LOGGER)
    if not any(isinstance(f, _RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(_RotaryReloadFilter())


def _find_embeddings(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(input embedding, lm_head) of a vLLM causal LM, or None without an lm_head."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    lm_head = getattr(model, "lm_head", None)
    if not isinstance(lm_head, ParallelLMHead):
        return None
    embeddings = [
        module
        for module in model.modules()
        if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead)
    ]
    if len(embeddings) != 1:
        raise RuntimeError(f"expected one input embedding, found {len(embeddings)}")
    return embeddings[0], lm_head
