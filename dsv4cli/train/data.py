"""Training data: the builtin stdlib corpus, HF/byte tokenizers, Megatron indexed and mock datasets.

Every source is reduced to one interface, a `SampleSource`: `len(src)` samples, and
`src[i] -> (tokens [s], labels [s], loss_mask [s])` as int64/float32 numpy arrays, deterministic
in `i`. The loop draws global batches by position (samples consumed so far), so resuming needs
only that position. Data-parallel rank r of d takes the r-th contiguous slice of each global
batch, which keeps the global batch identical for any layout.

Builtin corpus: the `*.py` files of this interpreter's standard library (sysconfig "stdlib"
path, sorted relative paths, site-packages excluded), split into train and held-out
documents by a hash of the relative path, documents concatenated in a seeded order with an
end-of-document token between them, and cut into windows of seq_length + 1 tokens.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

# --------------------------------------------------------------------------- tokenizers


class DataError(ValueError):
    """Bad data input (missing files, a tokenizer that does not fit the model): exit 2."""


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

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)


def make_tokenizer(name: str, model_vocab_size: int):
    """`byte` or a path to a tokenizer.json -> tokenizer with vocab_size, eod, encode_array."""
    if name == "byte":
        return ByteTokenizer(model_vocab_size)
    return HFTokenizer(name, model_vocab_size)


# --------------------------------------------------------------------------- builtin corpus


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
        ids = np.concatenate([self.tok.encode_array(text), np.array([self.tok.eod], dtype=np.int64)])
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
        import bisect

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
        s = self.seq_length
        w = self.stream.window(self.window_index(i) * s, s + 1)
        return w[:-1], w[1:], np.ones(s, dtype=np.float32)


# --------------------------------------------------------------------------- Megatron datasets


class MegatronSource:
    """SampleSource over a megatron-core GPTDataset (indexed blend or mock)."""

    def __init__(self, dataset):
        self.ds = dataset

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i % len(self.ds)]
        return (
            np.asarray(item["tokens"], dtype=np.int64),
            np.asarray(item["labels"], dtype=np.int64),
            np.asarray(item["loss_mask"], dtype=np.float32),
        )


def _indexed_blend(spec) -> Optional[tuple[list[str], Optional[list[float]]]]:
    """(paths, weights) of data.source = 'indexed' after checking the files exist; None for mock data."""
    d = spec.data
    if d.source != "indexed":
        return None
    if not d.paths:
        raise DataError("data.paths: source = 'indexed' needs at least one dataset prefix")
    for p in d.paths:
        for ext in (".bin", ".idx"):
            if not Path(p + ext).is_file():
                raise DataError(f"data.paths: {p + ext} does not exist")
    if d.weights and len(d.weights) != len(d.paths):
        raise DataError(f"data.weights: {len(d.weights)} weights for {len(d.paths)} paths")
    return list(d.paths), list(d.weights) if d.weights else None


def _valid_percent(valid_fraction: float) -> int:
    """megatron splits documents by whole percents: the held-out share of data.valid_fraction."""
    return max(1, round(valid_fraction * 100))


def split_document_ranges(num_documents: int, valid_percent: int) -> tuple[range, range]:
    """Document index ranges (train, valid) megatron's GPTDataset gives a data set of
    `num_documents` under the split "100-p,p,0" (its own split matrix and rounding)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(f"{100 - valid_percent},{valid_percent},0"))
    out = []
    for bookends in matrix[:2]:
        if bookends is None:
            out.append(range(0))
        else:
            out.append(range(int(round(bookends[0] * num_documents)), int(round(bookends[1] * num_documents))))
    return out[0], out[1]


def check_splits(spec, num_train: int, num_valid: int) -> None:
    """Every indexed data set must give each split that samples are drawn from at least one
    non-empty document (megatron's GPTDataset loops forever on an empty one). Raises DataError
    naming data.valid_fraction, the path and the document counts."""
    blend = _indexed_blend(spec)
    if blend is None:
        return
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    pct = _valid_percent(spec.data.valid_fraction)
    for path in blend[0]:
        try:
            index = IndexedDataset(path, mmap=True)
            lengths = np.array(index.sequence_lengths, dtype=np.int64)  # a copy: the mmap closes with `index`
            del index
        except Exception as e:  # a damaged .idx: say which file, not where megatron tripped
            raise DataError(f"data.paths: cannot read {path}.idx ({type(e).__name__}: {e})") from None
        n = len(lengths)
        train, valid = split_document_ranges(n, pct)
        for name, docs, wanted in (("training", train, num_train), ("validation", valid, num_valid)):
            if wanted > 0 and int(lengths[docs.start:docs.stop].sum()) == 0:
                fix = _split_fix(n)
                raise DataError(
                    f"data.valid_fraction: {spec.data.valid_fraction} leaves the {name} split of {path} with "
                    f"{len(docs)} of {n} documents (train {len(train)}, validation {len(valid)}; "
                    f"{wanted} samples requested); {fix}")


def _split_fix(num_documents: int) -> str:
    """What to change so both splits of a data set of `num_documents` get a document."""
    ok = [pct for pct in range(1, 100) if all(len(r) for r in split_document_ranges(num_documents, pct))]
    if not ok:
        return "a data set needs at least 2 documents (one per split); prepare a larger one"
    return f"use a data.valid_fraction between {ok[0] / 100:g} and {ok[-1] / 100:g}, or a larger data set"


def check_data(spec) -> None:
    """The data settings a run will use, checked without building a dataset (cheap; no process
    group): tokenizer against the model, data files present, no empty split. Raises DataError."""
    make_tokenizer(spec.data.tokenizer, spec.model.vocab_size)
    check_splits(spec, *_sample_counts(spec))


def _sample_counts(spec) -> tuple[int, int]:
    """(training samples, held-out samples) a run draws from the data sets."""
    t = spec.train
    return t.steps * t.global_batch_size, t.eval_batches * t.global_batch_size


def _megatron_datasets(spec, tokenizer, num_train: int, num_valid: int):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    blend = _indexed_blend(spec)
    check_splits(spec, num_train, num_valid)
    valid_pct = _valid_percent(spec.data.valid_fraction)
    config = GPTDatasetConfig(
        random_seed=spec.train.seed,
        sequence_length=spec.model.seq_length,
        blend=blend,
        split=f"{100 - valid_pct},{valid_pct},0",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    cls = MockGPTDataset if blend is None else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(
        cls, [num_train, num_valid, 0], lambda: True, config
    ).build()
    return MegatronSource(train), MegatronSource(valid)


@dataclass
class DataSources:
    train: object
    valid: object
    tokenizer: object


def build_sources(spec) -> DataSources:
    """Train and held-out SampleSources for a spec (sizes from train.steps and eval settings)."""
    tok = make_tokenizer(spec.data.tokenizer, spec.model.vocab_size)
    if spec.data.source == "builtin":
        args = (tok, spec.model.seq_length, spec.data.valid_fraction, spec.train.seed)
        return DataSources(BuiltinCorpus("train", *args), BuiltinCorpus("valid", *args), tok)
    train, valid = _megatron_datasets(spec, tok, *_sample_counts(spec))
    return DataSources(train, valid, tok)


# --------------------------------------------------------------------------- batching


def microbatches(source, position: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
                 ) -> list[dict]:
    """This DP rank's micro-batches of the global batch that starts at sample `position`.

    -> [{"tokens", "labels", "loss_mask", "position_ids"}] of numpy arrays [b, s].
    """
    per_rank = global_batch // dp_size
    start = position + dp_rank * per_rank
    out = []
    for m in range(per_rank // micro_batch):
        rows = [source[start + m * micro_batch + j] for j in range(micro_batch)]
        tokens = np.stack([r[0] for r in rows])
        out.append({
            "tokens": tokens,
            "labels": np.stack([r[1] for r in rows]),
            "loss_mask": np.stack([r[2] for r in rows]),
            "position_ids": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).copy(),
        })
    return out


# --------------------------------------------------------------------------- prepare-data


def prepare_data(input_jsonl: str, out_prefix: str, tokenizer: str = "byte", key: str = "text",
                 vocab_size: Optional[int] = None) -> dict:
    """JSON lines -> Megatron indexed dataset OUT_PREFIX.bin/.idx (one document per line + eod).

    Written to temporary files beside the target, then renamed. -> {"documents", "tokens", ...}.
    """
    import os

    src = Path(input_jsonl)
    if not src.is_file():
        raise DataError(f"{input_jsonl}: no such file")
    if tokenizer == "byte":
        tok = ByteTokenizer(vocab_size or 256)  # eod = NUL: the ids fit a model with vocab_size 256
    else:
        tok = HFTokenizer(tokenizer, vocab_size or 2**31)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.int32
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=dtype)
    docs = tokens = 0
    try:
        with src.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{input_jsonl}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], str):
                    raise DataError(f"{input_jsonl}:{lineno}: no string field '{key}' (use --key)")
                ids = np.concatenate([tok.encode_array(obj[key]), np.array([tok.eod], dtype=np.int64)])
                import torch

                builder.add_document(torch.from_numpy(ids.astype(dtype)), [len(ids)])
                docs += 1
                tokens += len(ids)
        if docs == 0:
            raise DataError(f"{input_jsonl}: no documents")
        builder.finalize(str(tmp) + ".idx")
        os.replace(str(tmp) + ".bin", str(out) + ".bin")
        os.replace(str(tmp) + ".idx", str(out) + ".idx")
    finally:
        for ext in (".bin", ".idx"):
            Path(str(tmp) + ext).unlink(missing_ok=True)
    return {"prefix": str(out), "documents": docs, "tokens": tokens, "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size, "eod": tok.eod}
