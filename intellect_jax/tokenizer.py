"""Hugging Face `tokenizers` helpers: load a tokenizer.json, train a byte-level BPE, find the EOS token, hash."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# The EOS token our trained tokenizers use, and the names other tokenizers use for it, in order of preference.
DEFAULT_EOS = "<|endoftext|>"
EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


class TokenizerError(ValueError):
    """A tokenizer problem; the message says the fix."""


def load(path: str | os.PathLike) -> Tokenizer:
    p = Path(path).expanduser()
    if not p.is_file():
        raise TokenizerError(f"tokenizer file {str(p)!r} does not exist; give a Hugging Face tokenizer.json, or use "
                             "--train-tokenizer --vocab-size N to train one on the input")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise TokenizerError(f"{str(p)!r} is not a Hugging Face tokenizer.json ({e})") from None


def train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str = DEFAULT_EOS) -> Tokenizer:
    """A byte-level BPE (GPT-2/Llama-3 style: any byte sequence encodes; no unknown tokens) with ``eos_token`` = 0.

    Training is deterministic for the same texts in the same order.
    """
    if vocab_size <= 256:
        raise TokenizerError(f"vocab size {vocab_size} is too small: a byte-level BPE starts with 256 byte tokens "
                             "plus EOS; use more (e.g. 4096)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def eos_id(tok: Tokenizer, eos_token: str = "") -> tuple[str, int]:
    """The EOS token and id: ``eos_token`` if given, else the first of EOS_CANDIDATES in the vocabulary."""
    for name in (eos_token,) if eos_token else EOS_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return name, int(i)
    if eos_token:
        raise TokenizerError(f"the tokenizer has no token {eos_token!r}; pass --eos-token with one of its "
                             "special tokens")
    raise TokenizerError(f"the tokenizer has none of the usual EOS tokens {list(EOS_CANDIDATES)}; pass "
                         "--eos-token NAME with the token that ends a document")


def sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
