"""Read stored tensors one at a time (PyTorch DCP, single process) — for stats, diff and verify."""

from __future__ import annotations

import warnings
from pathlib import Path

from dsv4cli.ckpt.errors import CheckpointError
from dsv4cli.ckpt.metadata import TensorEntry


def last_line(e: BaseException) -> str:
    """The innermost one-line reason of an exception (DCP wraps the real one in a multi-line report)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


class TensorReader:
    """Loads one named tensor at a time from a DCP directory, reusing the parsed `.metadata`."""

    def __init__(self, iter_dir: str | Path, dcp_metadata=None):
        import torch.distributed.checkpoint as dcp

        md = dcp_metadata

        class _Reader(dcp.FileSystemReader):
            def read_metadata(self, *args, **kwargs):
                nonlocal md
                if md is None:
                    md = super().read_metadata(*args, **kwargs)
                return md

        self._reader = _Reader(str(iter_dir))
        self._dir = str(iter_dir)

    def load(self, entry: TensorEntry):
        """The full (global) tensor of one entry, on CPU, in its stored dtype.

        Raises CheckpointError (naming the tensor) when its bytes cannot be read: a truncated or
        damaged data file, a missing file (dcp_load)."""
        import torch

        t = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
        self.dcp_load(entry.name, t)
        return t

    def dcp_load(self, name: str, out, planner=None) -> None:
        """Fill `out` with stored tensor `name` through DCP's load (`planner`: DCP's default, or one
        that reads a region of it). DCP reports unreadable bytes as a CheckpointException, which is a
        BaseException: caught here and turned into a one-line CheckpointError naming the tensor."""
        import torch.distributed.checkpoint as dcp

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({name: out}, storage_reader=self._reader, no_dist=True, planner=planner)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise CheckpointError(f"{self._dir}: cannot read tensor {name} ({type(e).__name__}: {last_line(e)})") from None


def load_all_tensors(iter_dir: str | Path) -> dict:
    """{name: tensor} of every stored tensor at once — for small checkpoints only (tests, examples)."""
    from dsv4cli.ckpt.metadata import read_checkpoint_info

    info = read_checkpoint_info(iter_dir)
    reader = TensorReader(info.iter_dir, info.dcp_metadata)
    return {name: reader.load(entry) for name, entry in info.tensors.items()}
