"""Read one region of a stored tensor from a torch_dist (DCP) checkpoint: one expert of a stacked
`[E, 2f, h]` expert weight, one half of a fused `[gate; up]` fc1, the first V rows of a padded
embedding; only the stored chunks that overlap the region are read (export_hf.py streams with it).

    RegionReader(iter_dir, dcp_metadata).read(entry, offsets, sizes) -> tensor [sizes], stored dtype

DCP's own resharding (`create_read_items_for_chunk_list`) finds the chunks and the byte ranges; a
planner whose only "local chunk" is the region makes `dcp.load` fill a tensor of the region's size.
"""

from __future__ import annotations

from dsv4cli.ckpt.metadata import TensorEntry
from dsv4cli.ckpt.tensors import TensorReader


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

        offsets = tuple(offsets) + (0,) * (len(entry.shape) - len(offsets))
        sizes = tuple(sizes) + tuple(entry.shape[len(sizes):])
        if offsets == (0,) * len(entry.shape) and sizes == tuple(entry.shape):
            return self.load(entry)
        out = torch.empty(sizes, dtype=getattr(torch, entry.dtype))
        self.dcp_load(entry.name, out, _region_planner(entry.name, offsets, sizes))
        return out
