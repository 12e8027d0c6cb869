"""The train / validation split of indexed data sets, checked before megatron builds them.

megatron's GPTDataset splits the documents of each data set by whole percents (split "100-p,p,0");
a split left without a non-empty document makes it loop forever, so `check_splits` says so first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from dsv4cli.train.data.errors import DataError


def indexed_blend(spec) -> Optional[tuple[list[str], Optional[list[float]]]]:
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


def valid_percent(valid_fraction: float) -> int:
    """megatron splits documents by whole percents: the held-out share of data.valid_fraction."""
    return max(1, round(valid_fraction * 100))


def split_vector(valid_percent: int) -> str:
    """megatron's `split` string for train / validation / test: "100-p,p,0" (no test split)."""
    return f"{100 - valid_percent},{valid_percent},0"


def split_document_ranges(num_documents: int, valid_percent: int) -> tuple[range, range]:
    """Document index ranges (train, valid) megatron's GPTDataset gives a data set of
    `num_documents` under the split "100-p,p,0" (its own split matrix and rounding)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split_vector(valid_percent)))
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
    blend = indexed_blend(spec)
    if blend is None:
        return
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    pct = valid_percent(spec.data.valid_fraction)
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
