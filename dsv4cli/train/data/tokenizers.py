"""Tokenizers: UTF-8 bytes or a local HF `tokenizer.json`; each has vocab_size, eod, encode_array and decode."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from dsv4cli.train.data.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; eod = 256 when the vocabulary has room, else byte 0 (NUL).

    NUL never occurs in Python source text, so with vocab_size = 256 it is a safe separator.
    """

    def __init__(self, vocab_size: int = 256):
        if vocab_size < 256:
            raise DataError(f"model.vocab_size: {vocab_size} is too small for the byte tokenizer (needs >= 256)")
        self.vocab_size = vocab_size
        self.eod = 256 if vocab_size > 256 else 0
        self.unique_identifiers = {"class": "ByteTokenizer", "vocab_size": vocab_size}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text; ids >= 256 (eod, padding) are dropped, bad UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)


_EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<｜end▁of▁sentence｜>", "[SEP]")


class HFTokenizer:
    """A local HF `tokenizer.json` loaded with the `tokenizers` library; eod from common names."""

    def __init__(self, path: str, model_vocab_size: int):
        p = Path(path)
        if not p.is_file():
            raise DataError(f"data.tokenizer: {path} does not exist (use 'byte' or a tokenizer.json path)")
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise DataError(f"data.tokenizer: cannot load {path}: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if self.vocab_size > model_vocab_size:
            raise DataError(
                f"data.tokenizer: {path} has {self.vocab_size} tokens, more than model.vocab_size ({model_vocab_size})"
            )
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eod = next((vocab[n] for n in _EOD_NAMES if n in vocab), None)
        self.eod = eod if eod is not None else self.vocab_size - 1
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        self.unique_identifiers = {"class": "HFTokenizer", "sha256": digest}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)


def make_tokenizer(name: str, model_vocab_size: int):
    """`byte` or a path to a tokenizer.json -> tokenizer with vocab_size, eod, encode_array."""
    if name == "byte":
        return ByteTokenizer(model_vocab_size)
    return HFTokenizer(name, model_vocab_size)


def encode_document(tokenizer, text: str) -> np.ndarray:
    """One document -> its token ids followed by the tokenizer's eod: int64 [n + 1]."""
    return np.concatenate([tokenizer.encode_array(text), np.array([tokenizer.eod], dtype=np.int64)])
