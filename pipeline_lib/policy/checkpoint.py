"""Policy checkpoints: every policy, tiny or pretrained, is saved and loaded here.

A checkpoint is a Hugging Face directory (safetensors weights, config, tokenizer);
GGUF files are read and unpacked into dense weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers

from pipeline_lib.adapters.atomic import atomic_directory


@contextlib.contextmanager
def transformers_progress_bars_off() -> Iterator[None]:
    """Silence transformers' per-call progress bars (e.g. "Writing model shards")."""
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers.utils.logging.enable_progress_bar()


def save_policy(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    directory: str | os.PathLike[str],
) -> Path:
    """Write model and tokenizer as a Hugging Face checkpoint directory, atomically.

    Files go to a temporary sibling first and are renamed into place, so a reader
    never sees a half-written checkpoint; an existing `directory` is replaced.
    """
    with atomic_directory(directory) as staging:
        with transformers_progress_bars_off():  # one bar per save would bury the caller's
            model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return Path(directory)


def load_policy(
    source: str,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` from a local directory, a Hub id or a GGUF file.

    `source` is a checkpoint directory or Hub id; with `gguf_file` the weights are
    that GGUF file inside it (needs the `gguf` and `accelerate` packages). A path
    that ends in `.gguf` is split into directory and file. GGUF weights are
    unpacked into a plain dense model (trainable, and savable as safetensors: a
    model left in GGUF blocks is neither). Tokenizers without a pad token get EOS
    as pad, as generation and batching need one.
    """
    if gguf_file is None and source.endswith(".gguf") and Path(source).is_file():
        source, gguf_file = str(Path(source).parent), Path(source).name
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    extra = {}
    if gguf_file is not None:
        extra["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source, gguf_file=gguf_file, dtype=dtype, **extra
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if gguf_file is not None and quantizer is not None:
        # The weights are dense; a quantizer left on the model would stop training
        # and `save_pretrained` (transformers drops it itself when dequantizing).
        quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
