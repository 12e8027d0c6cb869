"""Per-tensor statistics, loading one tensor at a time (`inspect checkpoint --stats`)."""

from __future__ import annotations

from typing import Iterable, Iterator

from dsv4cli.ckpt.errors import CheckpointError
from dsv4cli.ckpt.metadata import CheckpointInfo, TensorEntry
from dsv4cli.ckpt.tensors import TensorReader


def tensor_stats(t) -> dict:
    """norm, mean, std, min, max (float64, finite values) and NaN/Inf counts of one tensor."""
    import torch

    x = t.detach().reshape(-1).to(torch.float64)
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return {"norm": None, "mean": None, "std": None, "min": None, "max": None, "nan": nan, "inf": inf}
    return {
        "norm": float(finite.norm()),
        "mean": float(finite.mean()),
        "std": float(finite.std(unbiased=False)),
        "min": float(finite.min()),
        "max": float(finite.max()),
        "nan": nan,
        "inf": inf,
    }


def iter_stats(info: CheckpointInfo, entries: Iterable[TensorEntry]) -> Iterator[tuple[TensorEntry, dict]]:
    """(entry, stats) for each entry; a tensor that cannot be read gets {'error': ...}."""
    reader = TensorReader(info.iter_dir, info.dcp_metadata)
    for e in entries:
        try:
            t = reader.load(e)
        except CheckpointError as ex:  # damaged bytes, flattened optimizer shards: report, keep going
            yield e, {"error": str(ex).split(": ", 1)[-1]}
            continue
        yield e, tensor_stats(t)
        del t
