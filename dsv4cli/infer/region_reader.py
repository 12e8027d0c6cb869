"""Read one region of a stored tensor from a torch_dist (DCP) checkpoint: one expert of a stacked
`[E, 2f, h]` expert weight, one half of a fused `[gate; up]` fc1, the first V rows of a padded
embedding; only the stored chunks that overlap the region are read (export_hf.py streams with it).

    RegionReader(iter_dir, dcp_metadata).read(entry, offsets, sizes) -> tensor [sizes], stored dtype

DCP's own resharding (`create_read_items_for_chunk_list`) finds the chunks and the byte ranges; a
planner whose only "local chunk" is the region makes `dcp.load` fill a tensor of the region's size.
"""

from __future__ import annotations

import warnings

from dsv4cli.ckpt.errors import CheckpointError
from dsv4cli.ckpt.metadata import TensorEntry
from dsv4cli.ckpt.tensors import TensorReader, _last_line


def _region_planner(fqn: str, offsets: tuple, sizes: tuple):
    """A DCP load planner that reads region [offsets, offsets + sizes) of `fqn` into state_dict[fqn]."""
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            return LoadPlan(create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk]))

        def lookup_tensor(self, index):
            return self.state_dict[index.fqn]

    return RegionPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


class RegionReader(TensorReader):
    """TensorReader (whole tensors, cached `.metadata`) that also reads regions of a tensor."""

    def read(self, entry: TensorEntry, offsets: tuple = (), sizes: tuple = ()):
        """Region [offsets, offsets + sizes) of `entry` (leading dimensions; the rest whole) -> a CPU
        tensor in its stored dtype. CheckpointError naming the tensor when its bytes cannot be read."""
        import torch
        import torch.distributed.checkpoint as dcp

        offsets = tuple(offsets) + (0,) * (len(entry.shape) - len(offsets))
        sizes = tuple(sizes) + tuple(entry.shape[len(sizes):])
        if offsets == (0,) * len(entry.shape) and sizes == tuple(entry.shape):
            return self.load(entry)
        out = torch.empty(sizes, dtype=getattr(torch, entry.dtype))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({entry.name: out}, storage_reader=self._reader, no_dist=True,
                         planner=_region_planner(entry.name, offsets, sizes))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"{self._dir}: cannot read tensor {entry.name} "
                                  f"({type(e).__name__}: {_last_line(e)})") from None
        return out
