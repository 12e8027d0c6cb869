"""Copying checkpoint files at disk speed: reflink, then the kernel's in-kernel copies, or hard links.

Every function here creates DST as a NEW file (it must not exist): nothing ever opens an existing
file for writing, so a hard-linked DST can never write into the source it shares data with.

- `copy_file`: a reflink (FICLONE: btrfs, XFS, ...; no data copied) where the filesystem has them,
  else `os.copy_file_range` (in-kernel, no user-space buffers), else `os.sendfile`, else a chunked
  read/write; -> bytes.
- `copy_ranges`: byte ranges of SRC back to back into DST with `os.copy_file_range` (same fallbacks).
- `link_file`: a hard link; across filesystems (EXDEV) or where links are not allowed, a
  CheckpointError naming the problem (the CLI's exit 2).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from dsv4cli.ckpt.errors import CheckpointError

_CHUNK = 16 << 20
_FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int)
_NO_FAST_PATH = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF,
                 errno.ETXTBSY, errno.EPERM, errno.ENOTTY}


def _reflink(fi: int, fo: int) -> bool:
    try:
        import fcntl

        fcntl.ioctl(fo, _FICLONE, fi)
        return True
    except (ImportError, OSError):
        return False


def _kernel_copy(fi: int, fo: int, length: int, src_off: int, dst_off: int) -> int:
    """Copy `length` bytes in the kernel -> bytes done (short only when the fast paths are missing)."""
    done = 0
    for fast in ("copy_file_range", "sendfile"):
        if not hasattr(os, fast):
            continue
        try:
            while done < length:
                if fast == "copy_file_range":
                    n = os.copy_file_range(fi, fo, length - done, src_off + done, dst_off + done)
                else:
                    os.lseek(fo, dst_off + done, os.SEEK_SET)
                    n = os.sendfile(fo, fi, src_off + done, length - done)
                if n == 0:
                    break  # source shorter than asked: the caller reports it
                done += n
            return done
        except OSError as e:
            if e.errno not in _NO_FAST_PATH:
                raise
    return done


def _user_copy(src, fo: int, length: int, src_off: int, dst_off: int) -> int:
    done = 0
    with open(src, "rb") as f:
        f.seek(src_off)
        os.lseek(fo, dst_off, os.SEEK_SET)
        while done < length:
            buf = f.read(min(length - done, _CHUNK))
            if not buf:
                break
            view = memoryview(buf)
            while view:
                view = view[os.write(fo, view):]
            done += len(buf)
    return done


def _copy_into(src, fi: int, fo: int, ranges: list[tuple[int, int]]) -> tuple[list[int], int]:
    offsets, pos = [], 0
    for off, length in ranges:
        offsets.append(pos)
        done = _kernel_copy(fi, fo, length, off, pos)
        if done < length:
            done += _user_copy(src, fo, length - done, off + done, pos + done)
        if done < length:
            raise CheckpointError(f"{src}: truncated at byte {off + done}")
        pos += length
    return offsets, pos


def _open_pair(src, dst) -> tuple[int, int]:
    fi = os.open(src, os.O_RDONLY)
    try:
        return fi, os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # a new file, never an existing one
    except BaseException:
        os.close(fi)
        raise


def copy_ranges(src: str | Path, dst: str | Path, ranges: list[tuple[int, int]]) -> tuple[list[int], int]:
    """Copy byte ranges (offset, length) of SRC into a new DST back to back -> (new offsets, bytes)."""
    fi, fo = _open_pair(src, dst)
    try:
        return _copy_into(src, fi, fo, ranges)
    finally:
        os.close(fo)
        os.close(fi)


def copy_file(src: str | Path, dst: str | Path) -> int:
    """SRC -> a new file DST, byte for byte (reflink where possible) -> bytes."""
    size = os.stat(src).st_size
    fi, fo = _open_pair(src, dst)
    try:
        if size and _reflink(fi, fo):
            return size
        return _copy_into(src, fi, fo, [(0, size)])[1]
    finally:
        os.close(fo)
        os.close(fi)


def link_file(src: str | Path, dst: str | Path) -> int:
    """Hard-link SRC at the new name DST -> SRC's size (no data written)."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno == errno.EXDEV:
            raise CheckpointError(
                f"--link: {src} and {Path(dst).parent} are on different filesystems; hard links need one "
                "filesystem (put DST on the source's filesystem, or convert without --link to copy)"
            ) from None
        if e.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EACCES):
            raise CheckpointError(f"--link: cannot hard-link {src} ({e.strerror}); convert without --link to copy") from None
        raise
    return os.stat(src).st_size


def transfer(src: Path, dst: Path, link: bool) -> int:
    """One unchanged file or directory tree: hard links with `link`, else fast copies -> bytes."""
    one = link_file if link else copy_file
    if src.is_dir():
        total = 0

        def copy_function(s, d):
            nonlocal total
            total += one(s, d)

        shutil.copytree(src, dst, copy_function=copy_function)
        return total
    return one(src, dst)
