"""Atomic writes: a file via a temporary file + os.replace, an iteration directory via a temporary directory.

    ROOT/.tmp_iter_0000100.<token>/   a save in progress (every rank writes here)
    ROOT/iter_0000100/                renamed from it once complete (publish, rank 0)
    ROOT/latest_checkpointed_iteration.txt   replaced last, so it never names an incomplete directory

A save killed midway leaves only its `.tmp_iter_*` directory, which the next save removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

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


def is_unusable_output(out: Path) -> bool:
    """True when `out` exists and is not an empty directory (a new directory may not replace it)."""
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


@contextlib.contextmanager
def new_directory(out: Path) -> Iterator[Path]:
    """Assemble a new directory `out` atomically: yields a hidden sibling to fill, renamed to `out`
    (an empty one is replaced) when the block ends without an error; removed in every case."""
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty: callers check is_unusable_output first
        os.rename(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
