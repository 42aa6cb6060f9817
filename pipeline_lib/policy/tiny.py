"""The embedded default policy: a character tokenizer and a tiny Qwen2 model.

Also the checkpoint I/O every policy goes through (`save_policy`, `load_policy`),
so the tiny model and a real Hugging Face model are handled by one code path.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOS_TOKEN = "<eos>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
# "-" is unused by the current levels; it is in the vocabulary so that a
# subtraction level can be added later without changing the embedding shape.
CHARACTERS = "0123456789+-*= "


def build_char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Return a tokenizer with one token per character of `CHARACTERS`.

    Ids: PAD 0, EOS 1, UNK 2, then the characters. Encoding adds no special
    tokens and decoding gives back the text, spaces included, for any text over
    `CHARACTERS` (other characters are dropped).

    It is a byte-level BPE with no merges, the form of Qwen2's own tokenizer:
    transformers 5 loads any checkpoint of model type "qwen2" with
    `Qwen2Tokenizer`, which rebuilds a byte-level BPE from the saved vocabulary,
    so a vocabulary in any other form (e.g. WordLevel with a literal " ") would
    silently lose its spaces on reload. With no merges every character stays
    its own token, however the text is pre-tokenized.
    """
    specials = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # Vocabulary entries are byte-level spellings: a space is "\u0120" ("Ġ").
    symbols = [byte_level.pre_tokenize_str(character)[0][0] for character in CHARACTERS]
    vocab = {token: index for index, token in enumerate([*specials, *symbols])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_max_length=64,
    )


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny Qwen2 policy (defaults: about 1.05 M parameters)."""

    hidden_size: int = 128
    """Width of the residual stream (and of the tied embeddings)."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads (as many key/value heads: no grouped-query attention)."""
    intermediate_size: int = 512
    """Width of the SwiGLU MLP."""
    max_position_embeddings: int = 64
    """Longest sequence (prompt + completion) in tokens."""
    seed: int = 0
    """Seed of the weight initialisation."""


def build_tiny_qwen2(
    tokenizer: transformers.PreTrainedTokenizerBase, config: TinyModelConfig
) -> transformers.Qwen2ForCausalLM:
    """Return a freshly initialised Qwen2 model whose vocabulary matches `tokenizer`."""
    model_config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed a forked RNG so building a model leaves the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = transformers.Qwen2ForCausalLM(model_config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def save_policy(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    directory: str | os.PathLike[str],
) -> Path:
    """Write model and tokenizer as a Hugging Face checkpoint directory, atomically.

    Files go to a temporary sibling first and are renamed into place, so a reader
    never sees a half-written checkpoint; an existing `directory` is replaced.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            # A directory cannot be renamed over a non-empty one: move the old
            # one aside first, so the swap leaves either old or new in place.
            retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


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
