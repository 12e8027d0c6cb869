"""Where a Megatron torch_dist checkpoint lives on disk: run root -> `iter_*` directory (docs/design.md §2.6).

A root holds `latest_checkpointed_iteration.txt` (an iteration number, or "release") and one
`iter_0000100/`-style directory per save; an iteration directory holds the PyTorch DCP files
(`.metadata`, `__R_K.distcp`), Megatron's `metadata.json` (older: `common.pt`) and dsv4's
`dsv4_spec.toml` / `dsv4_meta.json`. A bare DCP directory (just `.metadata` + data files) is
accepted too (its iteration then comes from `dsv4_meta.json`, when there is one). A save in progress
is a `.tmp_iter_0000100.<token>` directory next to the iteration directories (dsv4cli.ckpt.atomic).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dsv4cli.ckpt.errors import CheckpointError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
DCP_METADATA = ".metadata"
MEGATRON_CONFIG = "metadata.json"
COMMON_STATE = "common.pt"
SPEC_FILE = "dsv4_spec.toml"
META_FILE = "dsv4_meta.json"
TMP_PREFIX = ".tmp_iter_"
_ITER_RE = re.compile(r"^iter_(\d+)$")


@dataclass(frozen=True)
class CheckpointLocation:
    """A resolved checkpoint: the directory holding `.metadata` and, when known, its root and iteration."""

    iter_dir: Path
    root: Optional[Path]
    iteration: Optional[int]


def iter_dir_name(iteration: int) -> str:
    """Megatron's directory name of an iteration: 100 -> 'iter_0000100'."""
    return f"iter_{iteration:07d}"


def iteration_of(name: str) -> Optional[int]:
    """'iter_0000100' -> 100; None for any other name."""
    m = _ITER_RE.match(name)
    return int(m.group(1)) if m else None


def latest_iteration(root: str | Path) -> Optional[int]:
    """The iteration a run root's tracker file names; None without one (or with `release` / garbage)."""
    f = Path(root) / TRACKER_FILE
    if not f.is_file():
        return None
    try:
        return int(f.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def read_meta(iter_dir: str | Path) -> dict:
    """dsv4_meta.json of an iteration directory; {} when absent or unreadable (metadata.py reports why)."""
    f = Path(iter_dir) / META_FILE
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def resolve_checkpoint(path: str | Path) -> CheckpointLocation:
    """A run root (latest iteration, or `release`), an `iter_*` directory or a bare DCP directory -> its
    location. The iteration comes from the directory name, else from dsv4_meta.json, else is None.

    Raises CheckpointError saying what is missing.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory)")
    if (path / DCP_METADATA).is_file():
        it = iteration_of(path.name)
        root = path.parent if it is not None and (path.parent / TRACKER_FILE).is_file() else None
        if it is None and isinstance(saved := read_meta(path).get("iteration"), int):
            it = saved
        return CheckpointLocation(path, root, it)
    tracker = path / TRACKER_FILE
    if tracker.is_file():
        try:
            text = tracker.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{tracker}: unreadable ({e})") from None
        if text == "release":
            iter_dir = path / "release"
            iteration = None
        else:
            try:
                iteration = int(text)
            except ValueError:
                raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}") from None
            iter_dir = path / iter_dir_name(iteration)
        if not iter_dir.is_dir():
            raise CheckpointError(f"{tracker} names iteration {text}, but {iter_dir} does not exist")
        if not (iter_dir / DCP_METADATA).is_file():
            raise CheckpointError(f"{iter_dir}: no {DCP_METADATA} file (incomplete or not a torch_dist checkpoint)")
        return CheckpointLocation(iter_dir, path, iteration)
    iters = sorted((d for d in path.iterdir() if d.is_dir() and iteration_of(d.name) is not None), key=lambda d: d.name)
    if iters:
        raise CheckpointError(
            f"{path}: no {TRACKER_FILE}; pass one iteration directory, e.g. {iters[-1]}"
        )
    raise CheckpointError(
        f"{path}: not a checkpoint (no {DCP_METADATA}, no {TRACKER_FILE}, no iter_* directories)"
    )
