"""`dsv4 convert-ckpt --link` (hard links) and the fast copy paths of dsv4cli/ckpt/filecopy.py."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from test_ckpt_convert import legacy, load_all, run, tree_hashes  # noqa: F401  (fixture)

NEW_FILES = {".metadata", "dsv4_spec.toml", "dsv4_meta.json", "__dsv4_hc_head.distcp"}


def _files(d: Path) -> dict[str, os.stat_result]:
    return {str(p.relative_to(d)): p.stat() for p in sorted(d.rglob("*")) if p.is_file()}


def test_link_shares_the_data_files_and_leaves_the_source_alone(legacy, tmp_path):  # noqa: F811
    import torch

    before = tree_hashes(legacy)
    copied = tmp_path / "copied"
    assert run("convert-ckpt", str(legacy), str(copied)).exit_code == 0
    res = run("convert-ckpt", str(legacy), str(tmp_path / "linked"), "--link", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["linked"] and out["bytes_copied"] > 0
    src, dst = _files(legacy / "iter_0000007"), _files(tmp_path / "linked" / "iter_0000007")
    linked = [n for n in dst if n not in NEW_FILES]
    assert any(n.endswith(".distcp") for n in linked)
    for name in linked:  # the same inode: no data written
        assert dst[name].st_ino == src[name].st_ino and dst[name].st_nlink == 2, name
    for name in NEW_FILES & set(dst):  # everything written is a new file of DST's own
        assert dst[name].st_nlink == 1 and (name not in src or dst[name].st_ino != src[name].st_ino), name
    a, b = load_all(copied / "iter_0000007"), load_all(tmp_path / "linked" / "iter_0000007")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tree_hashes(legacy) == before
    # replacing (--force) or deleting the linked DST leaves the source as it was
    assert run("convert-ckpt", str(legacy), str(tmp_path / "linked"), "--link", "--force").exit_code == 0
    import shutil

    shutil.rmtree(tmp_path / "linked")
    assert tree_hashes(legacy) == before and all(s.st_nlink == 1 for s in _files(legacy).values())
    assert "hard-linked to SRC: 3 files" in run("convert-ckpt", str(legacy), str(tmp_path / "l2"), "--link").output


def test_linked_megatron_checkpoint_evaluates_as_the_copied_one(megatron_1proc, tmp_path):
    """A real megatron checkpoint: the --link result reproduces the legacy model exactly as the copy does."""
    from dsv4cli.ckpt.convert import convert_checkpoint
    from test_ckpt_megatron import _spec, save_model_checkpoint

    save_model_checkpoint(_spec("average", depth=1), tmp_path / "legacy", seed=5)
    checks = {}
    for link in (False, True):
        result = convert_checkpoint(tmp_path / "legacy", tmp_path / f"out{int(link)}", verify=True, link=link)
        assert result.linked is link and result.verify["ok"], result.verify
        checks[link] = {c["check"]: c for c in result.verify["checks"]}["model"]
    for key in ("loss_legacy", "loss_converted", "max_abs_logit_diff"):
        assert checks[True][key] == checks[False][key], key


def test_link_across_filesystems_is_exit_2_and_leaves_nothing(legacy, tmp_path, monkeypatch):  # noqa: F811
    def cross_device(src, dst, *a, **k):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), str(dst))

    monkeypatch.setattr(os, "link", cross_device)
    res = run("convert-ckpt", str(legacy), str(tmp_path / "dst"), "--link")
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert line.startswith("error: --link:") and "different filesystems" in line and "without --link" in line
    assert "\n" not in line and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy"]


def _data(n: int) -> bytes:
    return bytes((i * 7919 + i // 251) % 256 for i in range(n))


@pytest.mark.parametrize("broken", [(), ("copy_file_range",), ("copy_file_range", "sendfile")],
                         ids=["kernel", "no-copy_file_range", "user-space"])
def test_copies_are_byte_identical_on_every_path(tmp_path, monkeypatch, broken):
    from dsv4cli.ckpt import filecopy

    data = _data(3 * 65536 + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    monkeypatch.setattr(filecopy, "_reflink", lambda fi, fo: False)
    for name in broken:  # e.g. an old kernel or a filesystem without the call
        def missing(*a, **k):
            raise OSError(errno.ENOSYS, "not here")

        monkeypatch.setattr(os, name, missing)
    assert filecopy.copy_file(src, tmp_path / "a.bin") == len(data)
    assert (tmp_path / "a.bin").read_bytes() == data
    ranges = [(70000, 5), (10, 65536), (len(data) - 3, 3)]
    offsets, size = filecopy.copy_ranges(src, tmp_path / "b.bin", ranges)
    assert offsets == [0, 5, 65541] and size == 65544
    assert (tmp_path / "b.bin").read_bytes() == b"".join(data[o:o + n] for o, n in ranges)
    with pytest.raises(Exception, match="truncated"):
        filecopy.copy_ranges(src, tmp_path / "c.bin", [(len(data) - 2, 4)])


def test_copies_never_open_an_existing_file(tmp_path):
    """DST must be new: a copy can never write through a hard link into another checkpoint's file."""
    from dsv4cli.ckpt import filecopy

    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    for copy in (filecopy.copy_file, lambda s, d: filecopy.copy_ranges(s, d, [(0, 3)]), filecopy.link_file):
        with pytest.raises(FileExistsError):
            copy(src, dst)
    assert dst.read_bytes() == b"old"
