"""torch.save's zip format for one contiguous float32 tensor, written without torch.

PyTorch DCP's FileSystemWriter stores each tensor item as the bytes of `torch.save(tensor)`, back to
back in a `.distcp` file (`_StorageInfo` holds each one's offset and length). `save_float32(shape,
data, template)` writes those bytes: the records torch writes, in its order (`data.pkl`: a protocol-2
pickle of `torch._utils._rebuild_tensor_v2` over persistent storage '0'; `.format_version`,
`.storage_alignment`, `byteorder`, `data/0`: the raw little-endian values, `version`,
`.data/serialization_id`), stored, each record's data aligned to `.storage_alignment` bytes with an
`FB` extra field, data descriptors, a zip64 end of central directory. The small records and the
archive name are copied from `template`, a torch.save blob of a float32 tensor written by the
torch that wrote the checkpoint (any of its tensors): the result is then byte-identical to what
that torch's `torch.save` writes, and `torch.load(..., weights_only=True)` reads it.
"""

from __future__ import annotations

import collections
import io
import struct
import zipfile
import zlib
from math import prod

from dsv4cli.ckpt import dcp_pickle

_MASK = (1 << 64) - 1
_RECORDS = ("data.pkl", ".format_version", ".storage_alignment", "byteorder", "data/0", "version",
            ".data/serialization_id")


class Template:
    """The archive name, small records and serialization-id prefix of a torch.save blob of one tensor."""

    def __init__(self, blob: bytes):
        try:
            self._parse(blob)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error, zlib.error, KeyError,
                IndexError, ValueError, NotImplementedError) as e:  # a damaged blob: torch's path copies it as is
            raise dcp_pickle.Unsupported(f"example torch.save blob unreadable ({type(e).__name__}: {e})") from None

    def _parse(self, blob: bytes) -> None:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            names = z.namelist()
            prefix = names[0].partition("/")[0] + "/"
            if [n.removeprefix(prefix) for n in names] != list(_RECORDS):
                raise dcp_pickle.Unsupported(f"torch.save records {names}")
            self.prefix = prefix
            self.records = {n: z.read(prefix + n) for n in _RECORDS if n not in ("data.pkl", "data/0")}
            pkl = z.read(prefix + "data.pkl")
        if self.records["byteorder"] != b"little" or pkl[:2] != b"\x80\x02":
            raise dcp_pickle.Unsupported("torch.save blob is not little-endian protocol 2")
        self.alignment = int(self.records[".storage_alignment"])
        sid = self.records[".data/serialization_id"]
        if len(sid) != 40 or not sid.isdigit() or self.alignment <= 0:
            raise dcp_pickle.Unsupported(f"serialization id {sid!r}")
        self.name_hash = sid[:20]  # a hash of the record names: the same for every one-tensor blob


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on uint64."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _MASK) + (seed >> 2)) & _MASK)) & _MASK


def _data_pkl(shape: tuple[int, ...]) -> bytes:
    """torch.save's data.pkl of a contiguous float32 tensor of `shape` on storage '0'."""
    rebuild = dcp_pickle.standin_class("torch._utils", "_rebuild_tensor_v2")
    storage = dcp_pickle.standin_class("torch", "FloatStorage")
    numel = prod(shape)
    stride = tuple(prod(shape[i + 1:]) for i in range(len(shape)))
    key = ("storage", storage, "0", "cpu", numel)
    tensor = dcp_pickle.call(rebuild, _Persistent(key), 0, tuple(shape), stride, False, collections.OrderedDict())

    class _P(dcp_pickle.Pickler):
        def persistent_id(self, obj):
            return obj.key if isinstance(obj, _Persistent) else None

    buf = io.BytesIO()
    _P(buf, protocol=2).dump(tensor)
    return buf.getvalue()


class _Persistent:
    def __init__(self, key: tuple):
        self.key = key


def save_float32(shape: tuple[int, ...], data: bytes, template: Template) -> bytes:
    """The bytes torch.save writes for a contiguous float32 tensor of `shape` holding `data`
    (little-endian, 4 * numel bytes)."""
    if len(data) != 4 * prod(shape):
        raise ValueError(f"{len(data)} bytes for a float32 tensor of shape {shape}")
    records = {"data.pkl": _data_pkl(shape), "data/0": data, **template.records}
    out = io.BytesIO()
    central = []
    crc_hash = 0
    for name in _RECORDS:
        body = records[name]
        if name == ".data/serialization_id":
            body = template.name_hash + b"%020d" % crc_hash
        full = (template.prefix + name).encode()
        offset = out.tell()
        start = offset + 30 + len(full) + 4
        pad = -start % template.alignment
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        crc = zlib.crc32(body)
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, 0x0808, 0, 0, 0, 0, 0, 0, len(full), len(extra)))
        out.write(full + extra + body)
        out.write(struct.pack("<4sIII", b"PK\x07\x08", crc, len(body), len(body)))
        crc_hash = _hash_combine(crc_hash, crc)
        central.append(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 0, 0x0808, 0, 0, 0, crc, len(body),
                                   len(body), len(full), 0, 0, 0, 0, 0, offset) + full)
    cd_offset = out.tell()
    cd = b"".join(central)
    out.write(cd)
    eocd64 = out.tell()
    n = len(central)
    out.write(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 0x2D, 0, 0, n, n, len(cd), cd_offset))
    out.write(struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd64, 1))
    out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(cd), cd_offset, 0))
    return out.getvalue()
