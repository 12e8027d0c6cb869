"""The tensors convert-ckpt adds, and their DCP data file and `.metadata` entries, without torch.

`NewTensor`: a new tensor's shape, dtype and float32 values (row-major), indexable like a flat
tensor; `.to_torch()` for the torch path. `EntryWriter(md, iter_dir)` takes a checkpoint's
`.metadata` read by dsv4cli.ckpt.dcp_pickle and writes new float32 tensors the way PyTorch DCP's
FileSystemWriter would: each one `torch.save`d (dsv4cli.ckpt.torch_zip) back to back into one data
file, and `TensorStorageMetadata` / `MetadataIndex` / `_StorageInfo` entries equal to those
`dcp.save` records for them. The entries are made by example: copies of an existing float32 tensor's
entries of the same checkpoint with the shape, key and place changed, so whatever fields the torch
that wrote it has stay as they were. Anything that has no such example raises dcp_pickle.Unsupported
(the caller then takes the torch path).
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass
from math import prod
from pathlib import Path
from types import SimpleNamespace

from dsv4cli.ckpt import dcp_pickle
from dsv4cli.ckpt.dcp_pickle import Unsupported, call, call_args, global_key, replace
from dsv4cli.ckpt.torch_zip import Template, save_float32


@dataclass
class NewTensor:
    """shape; values: array('f') of prod(shape) float32 values, row-major; dtype: the name it is stored as."""

    shape: tuple[int, ...]
    values: array
    dtype: str = "float32"

    @classmethod
    def full(cls, shape: tuple[int, ...], value: float, dtype: str = "float32") -> "NewTensor":
        """`value` rounded to float32 (as torch's .to(torch.float32) rounds a float64), everywhere."""
        return cls(tuple(shape), array("f", [value]) * prod(shape), dtype)

    def __getitem__(self, i: int) -> float:  # flat index
        return self.values[i]

    def __setitem__(self, i: int, v: float) -> None:
        self.values[i] = v

    def to_bytes(self) -> bytes:
        """The values as little-endian float32."""
        if sys.byteorder == "little":
            return self.values.tobytes()
        swapped = array("f", self.values)
        swapped.byteswap()
        return swapped.tobytes()

    def to_torch(self):
        import torch

        t = torch.frombuffer(bytearray(self.to_bytes()), dtype=torch.float32).reshape(self.shape)
        return t.to(getattr(torch, self.dtype))


_FLOAT32 = ("torch", "float32")
_STRIDED = ("torch.serialization", "_get_layout")
_MEM_FORMAT = ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING")


def _fresh_float32(item) -> bool:
    """Are item's TensorProperties what DCP records for a new contiguous float32 CPU tensor?"""
    try:
        p = item.properties
        return (global_key(p.dtype) == _FLOAT32 and p.requires_grad is False and p.pin_memory is False
                and global_key(p.layout) == _STRIDED and call_args(p.layout) == ("torch.strided",)
                and global_key(p.memory_format) == _MEM_FORMAT and call_args(p.memory_format) == (0,))
    except (AttributeError, KeyError):
        return False


class EntryWriter:
    """Writes new float32 tensors into a data file and makes their entries, by the example of md's."""

    def __init__(self, md, iter_dir: Path):
        if global_key(md) is None:
            raise Unsupported("metadata not read by dcp_pickle")
        sdm = md.state_dict_metadata
        fp32 = {k for k, v in sdm.items() if type(v).__name__ == "TensorStorageMetadata" and _fresh_float32(v)}
        plain = [(idx, si) for idx, si in (md.storage_data or {}).items()
                 if global_key(idx) and idx.fqn in fp32 and isinstance(si.__dict__["_state"], dict)
                 and si.__dict__["_state"].get("transform_descriptors") is None]
        if not plain:
            raise Unsupported("no float32 tensor entry to copy")
        self.index, self.storage = min(plain, key=lambda t: t[1].length)  # the smallest blob to read
        self.entry = sdm[self.index.fqn]
        self.size_class = type(self.entry.size)
        with open(Path(iter_dir) / self.storage.relative_path, "rb") as f:
            f.seek(self.storage.offset)
            self.template = Template(f.read(self.storage.length))

    def _size(self, dims) -> dcp_pickle.StandIn:
        return call(self.size_class, tuple(dims))

    def write(self, tensors: dict[str, NewTensor], path: Path) -> SimpleNamespace:
        """Write `tensors` (float32) into a new file `path` -> SimpleNamespace(state_dict_metadata,
        storage_data) of their entries, as `FileSystemReader.read_metadata()` of a dcp.save gives them."""
        if any(t.dtype != "float32" for t in tensors.values()):
            raise Unsupported("only float32 tensors are written without torch")
        sdm, storage = {}, {}
        offset = 0
        with open(path, "xb") as f:
            for key, t in tensors.items():
                blob = save_float32(t.shape, t.to_bytes(), self.template)
                f.write(blob)
                zeros = self._size([0] * len(t.shape))
                chunk = replace(self.entry.chunks[0], offsets=zeros, sizes=self._size(t.shape))
                sdm[key] = replace(self.entry, size=self._size(t.shape), chunks=[chunk])
                index = replace(self.index, fqn=key, offset=zeros, index=0)
                storage[index] = replace(self.storage, relative_path=path.name, offset=offset, length=len(blob))
                offset += len(blob)
        return SimpleNamespace(state_dict_metadata=sdm, storage_data=storage)
