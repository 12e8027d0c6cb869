"""Atomic writes: a file via a temporary file + os.replace, an iteration directory via a temporary directory.

    ROOT/.tmp_iter_0000100.<token>/   a save in progress (every rank writes here)
    ROOT/iter_0000100/                renamed from it once complete (publish, rank 0)
    ROOT/latest_checkpointed_iteration.txt   replaced last, so it never names an incomplete directory

A save killed midway leaves only its `.tmp_iter_*` directory, which the next save removes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from dsv4cli.ckpt.layout import TMP_PREFIX, TRACKER_FILE, iter_dir_name, iteration_of, latest_iteration


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable; best effort."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_text_atomic(path: str | Path, text: str, mode: Optional[int] = None, fsync: bool = True) -> None:
    """Write `text` to `path` through a temporary file in the same directory (made if missing) and
    os.replace: readers see the old or the new content, never a part. `mode`: chmod the file (e.g.
    0o755 for a script); `fsync`: flush file and directory to disk before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def tmp_dir_for(root: Path, iteration: int, token: str) -> Path:
    """Where a save of `iteration` writes before it is published: ROOT/.tmp_iter_0000100.<token>."""
    return Path(root) / f"{TMP_PREFIX}{iteration:07d}.{token}"


def remove_stale_tmp(root: Path) -> list[Path]:
    """Delete leftovers of saves that were killed midway (rank 0, before a new save)."""
    removed = []
    for p in Path(root).glob(TMP_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def publish(tmp: Path, root: Path, iteration: int) -> Path:
    """Rename a complete temp dir to iter_XXXXXXX and move the tracker file to it (rank 0)."""
    final = Path(root) / iter_dir_name(iteration)
    fsync_dir(tmp)
    if final.exists():  # re-saving an iteration: move the old one aside first
        old = tmp_dir_for(root, iteration, f"old{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(Path(root))
    write_text_atomic(Path(root) / TRACKER_FILE, f"{iteration}\n")
    return final


def prune(root: Path, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` iter_* dirs (0 = all); never removes the one the tracker file names."""
    if keep_last <= 0:
        return []
    latest = latest_iteration(root)
    dirs = sorted((it, p) for p in Path(root).glob("iter_*")
                  if p.is_dir() and (it := iteration_of(p.name)) is not None)
    removed = []
    for it, p in dirs[:-keep_last]:
        if it == latest:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
