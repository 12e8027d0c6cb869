"""The builtin corpus: the `*.py` files of this interpreter's standard library as a SampleSource.

Documents are the stdlib's `*.py` files (sysconfig "stdlib" path, sorted relative paths,
site-packages excluded), split into train and held-out documents by a hash of the relative
path, concatenated in a seeded order with an end-of-document token between them, and cut into
windows of seq_length + 1 tokens.
"""

from __future__ import annotations

import bisect
import hashlib
import sysconfig
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dsv4cli.train.data.errors import DataError
from dsv4cli.train.data.tokenizers import encode_document


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents(root: Optional[Path] = None) -> list[str]:
    """Sorted relative paths of the stdlib's *.py files (site-packages excluded)."""
    root = root or stdlib_root()
    docs = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()
    ]
    return sorted(docs)


def is_heldout(relpath: str, valid_fraction: float) -> bool:
    """Deterministic document split: the first 8 hex digits of sha256(path) as a fraction."""
    h = int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16)
    return h / 2**32 < valid_fraction


def split_documents(docs: Sequence[str], valid_fraction: float) -> tuple[list[str], list[str]]:
    """-> (train, heldout) lists of relative paths, both keeping the input order."""
    train = [d for d in docs if not is_heldout(d, valid_fraction)]
    held = [d for d in docs if is_heldout(d, valid_fraction)]
    if not held:
        held = train[-1:]
        train = train[:-1]
    return train, held


class TokenStream:
    """Documents tokenized lazily and concatenated with eod; `window(start, n)` -> tokens [n]."""

    def __init__(self, root: Path, docs: Sequence[str], tokenizer, cycle: bool = True):
        self.root, self.docs, self.tok, self.cycle = root, list(docs), tokenizer, cycle
        self._chunks: list[np.ndarray] = []
        self._starts: list[int] = []  # stream offset of each chunk
        self._length = 0
        self._next_doc = 0

    def _read_next(self) -> bool:
        if self._next_doc >= len(self.docs):
            if not self.cycle or not self.docs:
                return False
            self._next_doc = 0  # next epoch: the same order again
        rel = self.docs[self._next_doc]
        self._next_doc += 1
        try:
            text = (self.root / rel).read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        ids = encode_document(self.tok, text)
        self._starts.append(self._length)
        self._chunks.append(ids)
        self._length += len(ids)
        return True

    def ensure(self, n: int) -> int:
        """Read documents until at least n tokens are available; returns the available length."""
        while self._length < n and self._read_next():
            pass
        return self._length

    def window(self, start: int, n: int) -> np.ndarray:
        if self.ensure(start + n) < start + n:
            raise IndexError(f"token stream has {self._length} tokens, asked for {start}+{n}")
        i = bisect.bisect_right(self._starts, start) - 1
        parts, need, offset = [], n, start - self._starts[i]
        while need > 0:
            piece = self._chunks[i][offset : offset + need]
            parts.append(piece)
            need -= len(piece)
            i, offset = i + 1, 0
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


class BuiltinCorpus:
    """SampleSource over the stdlib corpus: window k = tokens [k*s, (k+1)*s + 1) of the stream.

    Train samples visit the windows of each block of `shuffle_block` consecutive windows in a
    seeded order, so a global batch mixes documents instead of holding one file's consecutive
    lines; held-out samples are the windows in order.
    """

    shuffle_block = 1024

    def __init__(self, split: str, tokenizer, seq_length: int, valid_fraction: float, seed: int,
                 root: Optional[Path] = None):
        root = root or stdlib_root()
        docs = stdlib_documents(root)
        if not docs:
            raise DataError(f"data.source: builtin corpus is empty (no *.py files under {root})")
        train, held = split_documents(docs, valid_fraction)
        chosen = train if split == "train" else held
        order = np.random.default_rng(seed).permutation(len(chosen)) if split == "train" else range(len(chosen))
        self.documents = [chosen[i] for i in order]
        self.seq_length = seq_length
        self.stream = TokenStream(root, self.documents, tokenizer, cycle=True)
        self._shuffle = split == "train"
        self._seed = seed
        self._perm: tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        return 2**62  # cycles over the documents

    def window_index(self, i: int) -> int:
        """Sample i -> the stream window it reads (a seeded permutation within each block)."""
        if not self._shuffle:
            return i
        block, j = divmod(i, self.shuffle_block)
        if self._perm[0] != block:
            self._perm = (block, np.random.default_rng([self._seed, block]).permutation(self.shuffle_block))
        return block * self.shuffle_block + int(self._perm[1][j])

    def __getitem__(self, i: int):
        """-> (tokens [s], labels [s], loss_mask [s]): int64, int64, float32."""
        s = self.seq_length
        w = self.stream.window(self.window_index(i) * s, s + 1)
        return w[:-1], w[1:], np.ones(s, dtype=np.float32)
