"""The embedded default policy: a tiny Qwen2-architecture model for the character tokenizer."""

from __future__ import annotations

import torch
import transformers

from pipeline_lib.config import TinyModelParams

DEFAULT_SHAPE = TinyModelParams()


def build_tiny_qwen2(
    tokenizer: transformers.PreTrainedTokenizerBase,
    shape: TinyModelParams = DEFAULT_SHAPE,
    *,
    seed: int = 0,
) -> transformers.Qwen2ForCausalLM:
    """A freshly initialised Qwen2 model whose vocabulary matches `tokenizer`.

    `shape` is params.yaml's `bootstrap.tiny` (defaults: about 1.05 M parameters);
    `seed` seeds the weight initialisation.
    """
    model_config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed a forked RNG so building a model leaves the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(model_config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model
