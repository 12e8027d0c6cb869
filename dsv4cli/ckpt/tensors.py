"""Read stored tensors one at a time (PyTorch DCP, single process) — for stats, diff and verify."""

from __future__ import annotations

import warnings
from pathlib import Path

from dsv4cli.ckpt.metadata import TensorEntry


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

    def load(self, entry: TensorEntry):
        """The full (global) tensor of one entry, on CPU, in its stored dtype."""
        import torch
        import torch.distributed.checkpoint as dcp

        t = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
        sd = {entry.name: t}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, storage_reader=self._reader, no_dist=True)
        return sd[entry.name]


def load_all_tensors(iter_dir: str | Path) -> dict:
    """{name: tensor} of every stored tensor at once — for small checkpoints only (tests, examples)."""
    from dsv4cli.ckpt.metadata import read_checkpoint_info

    info = read_checkpoint_info(iter_dir)
    reader = TensorReader(info.iter_dir, info.dcp_metadata)
    return {name: reader.load(entry) for name, entry in info.tensors.items()}
