"""The embedded default's tokenizer: one token per character of arithmetic problems."""

from __future__ import annotations

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
