"""`dsv4 inspect checkpoint`: one JSON-ready report of a checkpoint, from metadata (plus stats on request)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from dsv4cli.ckpt.conformance import check_conformance
from dsv4cli.ckpt.errors import CheckpointError
from dsv4cli.ckpt.keys import is_optimizer_key
from dsv4cli.ckpt.layout import SPEC_FILE
from dsv4cli.ckpt.metadata import CheckpointInfo, TensorEntry, read_checkpoint_info

_FOLDS = [
    (re.compile(r"^(decoder\.layers\.)\d+\."), r"\1*."),
    (re.compile(r"^(mtp\.layers\.)\d+\."), r"\1*."),
    (re.compile(r"\.local_experts\.\d+\."), ".local_experts.*."),
]


def module_group(name: str) -> str:
    """The tree node a stored name belongs to: 'decoder.layers', 'mtp.layers.*', 'optimizer.state.exp_avg',
    'chained_1.optimizer.state.exp_avg', 'optimizer.distributed.dp_group_idx_0', ..."""
    if is_optimizer_key(name):
        parts = name.split("/", 1)[0].split(".")
        return ".".join(parts[:4] if parts[0].startswith("chained_") else parts[:3])
    folded = fold_repeats(name)
    for prefix in ("decoder.layers.*", "decoder.layers", "mtp.layers.*"):
        if folded.startswith(prefix + "."):
            return prefix
    return folded.split(".", 1)[0]


def fold_repeats(name: str) -> str:
    """Per-layer / per-depth / per-expert indices -> '*' so repeated layers fold into one row."""
    for pat, rep in _FOLDS:
        name = pat.sub(rep, name)
    return name


def tensor_tree(entries: list[TensorEntry]) -> list[dict]:
    """[{group, rows: [{name, count, shape, dtype, bytes, shards}], tensors, params, bytes}] in stored order."""
    groups: dict[str, dict] = {}
    for e in entries:
        g = groups.setdefault(module_group(e.name), {"group": module_group(e.name), "rows": {}, "tensors": 0,
                                                      "params": 0, "bytes": 0})
        g["tensors"] += 1
        g["params"] += e.numel
        g["bytes"] += e.bytes
        folded = fold_repeats(e.name)
        row = g["rows"].get(folded)
        if row is None or row["shape"] != list(e.shape) or row["dtype"] != e.dtype:
            key = folded if row is None else e.name
            g["rows"][key] = {"name": key, "count": 1, "shape": list(e.shape), "dtype": e.dtype,
                              "bytes": e.bytes, "shards": e.shards, "first": e.name}
        else:
            row["count"] += 1
            row["bytes"] += e.bytes
    out = []
    for g in groups.values():
        rows = []
        for row in g["rows"].values():
            first = row.pop("first")
            if row["count"] == 1:
                row["name"] = first  # nothing folded: show the stored name
            rows.append(row)
        out.append(dict(g, rows=rows))
    return out


def _spec_for(info: CheckpointInfo, spec_path: Optional[str], overrides: Sequence[str] = ()):
    """The spec to compare against: --spec, else the saved one; `overrides` (--set) apply to it."""
    from dsv4cli.spec.load import SpecError, load_spec

    if spec_path is None and not overrides:
        return (info.spec, "saved dsv4_spec.toml") if info.spec is not None else (None, None)
    if spec_path is None:
        if info.spec is None:
            raise CheckpointError("--set needs a spec to override: no readable one is saved in the checkpoint; "
                                  "pass --spec")
        path, source = info.iter_dir / SPEC_FILE, "saved dsv4_spec.toml + --set"
    else:
        path, source = spec_path, spec_path
    try:
        return load_spec(path, overrides, rules=False), source
    except SpecError as e:
        raise CheckpointError(f"{'--spec ' + spec_path if spec_path else source}: "
                              + "; ".join(str(p) for p in e.problems)) from None


def inspect_checkpoint(path: str | Path, spec_path: Optional[str] = None, stats: bool = False,
                       pattern: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    """Report of a checkpoint: format, iteration, spec, provenance, tensors, totals, tree, conformance.

    Reads `.metadata`, `metadata.json`, `dsv4_spec.toml`, `dsv4_meta.json` only, unless stats is set
    (then it loads the selected tensors one at a time). Raises CheckpointError when unreadable.
    """
    info = read_checkpoint_info(path)
    spec, spec_source = _spec_for(info, spec_path, overrides)
    entries = [e for e in info.tensors.values() if pattern is None or fnmatch.fnmatchcase(e.name, pattern)]
    by_dtype: dict[str, dict] = {}
    for e in entries:
        d = by_dtype.setdefault(e.dtype, {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += e.numel
        d["bytes"] += e.bytes
    tensors = [{"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "bytes": e.bytes, "shards": e.shards}
               for e in entries]
    if stats:
        from dsv4cli.ckpt.stats import iter_stats

        for row, (_, st) in zip(tensors, iter_stats(info, entries)):
            row["stats"] = st
    conf = check_conformance(info, spec, spec_source)
    model = [e for e in entries if not e.is_optimizer]
    return {
        "path": str(path),
        "iter_dir": str(info.iter_dir),
        "format": info.format,
        "iteration": info.iteration,
        "spec": spec.model_dump(mode="json") if spec is not None else None,
        "spec_source": spec_source,
        "meta": info.meta,
        "filter": pattern,
        "tensor_count": len(entries),
        "object_count": len(info.objects),
        "objects": info.objects,
        "total_params": sum(e.numel for e in model),
        "total_bytes": sum(e.bytes for e in entries),
        "model_bytes": sum(e.bytes for e in model),
        "optimizer_bytes": sum(e.bytes for e in entries if e.is_optimizer),
        "by_dtype": by_dtype,
        "files": info.files,
        "tensors": tensors,
        "tree": tensor_tree(entries),
        "conformant": conf.conformant,
        "legacy": conf.legacy,
        "fix_command": conf.fix_command,
        "problems": [asdict(p) for p in conf.problems],
        "stats": stats,
    }
