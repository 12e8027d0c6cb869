"""Reading a safetensors directory one tensor at a time (the `safetensors` package; nothing is written).

    HF_DIR/model.safetensors                                  one file, or
    HF_DIR/model.safetensors.index.json {"weight_map": {name: file}} + the files it names

`tensor_sources` lists every tensor with its file from the headers alone; `stream` loads them one by one.
`ShardWriter` writes one file tensor by tensor (export-hf): the header first, from the names, dtypes
and shapes known in advance, then each tensor's bytes as it comes, so no shard is ever held in memory.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

INDEX_FILE = "model.safetensors.index.json"
CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
         "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
         "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0"}
"""torch dtype name -> safetensors dtype code."""
TORCH_DTYPES = {code: name for name, code in CODES.items()}
"""safetensors dtype code -> torch dtype name."""
STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
"""safetensors dtype code -> bytes per stored value."""


class SafetensorsError(ValueError):
    """A missing, unreadable or inconsistent safetensors directory (bad input: exit 2)."""


@dataclass(frozen=True)
class SourceTensor:
    """One stored tensor as its file's header describes it (no data read): its name, the file that
    holds it, its shape and its safetensors dtype ("F32", "BF16", "I64", "F8_E4M3", ...). A quantized
    weight carries its `scale` tensor, and `shape` is then its dequantized shape (dequant.py). A toy
    variant (toy.py) reads only the first `rows` rows, or takes integer values `modulo` a number."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str
    scale: Optional["SourceTensor"] = None
    rows: Optional[int] = None
    modulo: Optional[int] = None


def data_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a directory: those the index names, else every *.safetensors file."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
        files = sorted({hf_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SafetensorsError(f"{index} names missing files: {', '.join(missing)}")
        return files
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise SafetensorsError(f"{hf_dir}: no *.safetensors files")
    return files


def tensor_sources(hf_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor of the directory (headers only). A name stored twice, or indexed in a file that
    lacks it, is an error naming it."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    out: dict[str, SourceTensor] = {}
    for path in data_files(hf_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in out:
                        raise SafetensorsError(f"tensor {name} is stored twice ({out[name].file.name}, {path.name})")
                    piece = f.get_slice(name)
                    out[name] = SourceTensor(name, path, tuple(piece.get_shape()), piece.get_dtype())
        except SafetensorsError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError and OSError
            raise SafetensorsError(f"{path}: unreadable safetensors file ({e})") from None
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        for name, file in weight_map.items():
            if name not in out or out[name].file.name != Path(file).name:
                raise SafetensorsError(f"{index}: tensor {name} is not in {file}")
    return out


def stream(sources):
    """Yield (SourceTensor, tensor) for each of `sources`, one tensor in memory at a time (a CPU torch
    tensor in its stored dtype); each file is opened once."""
    for source, tensor, _scale in stream_scaled(sources):
        yield source, tensor


def stream_scaled(sources):
    """Yield (SourceTensor, tensor, scale tensor or None) for each of `sources`, one tensor in memory
    at a time (CPU torch tensors in their stored dtypes); each file is opened once (a scale stored in
    another file than its weight: that file once per scale)."""
    from safetensors import safe_open

    by_file: dict[Path, list[SourceTensor]] = {}
    for source in sources:
        by_file.setdefault(source.file, []).append(source)
    for path, group in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for source in group:
                scale = None
                if source.scale is not None and source.scale.file == path:
                    scale = f.get_tensor(source.scale.name)
                elif source.scale is not None:
                    with safe_open(str(source.scale.file), framework="pt") as other:
                        scale = other.get_tensor(source.scale.name)
                yield source, f.get_tensor(source.name), scale


def _header(path: str) -> tuple[dict, int]:
    """A safetensors file's header and where its data starts (8-byte length, JSON, data); cached while
    the file keeps its size and modification time."""
    stat = os.stat(path)
    return _read_header(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_header(path: str, size: int, mtime_ns: int) -> tuple[dict, int]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


def read_tensor(path: Path, name: str, element: Optional[int] = None):
    """One tensor of a safetensors file read into a fresh CPU torch tensor of its stored dtype: its
    bytes go straight into the tensor's own memory (no mapping of the file, nothing kept).
    `element`: only tensor[element] (a fused [E, ...] tensor's expert: its own contiguous byte range)."""
    import torch

    header, start = _header(str(path))
    entry = header[name]
    begin, end = entry["data_offsets"]
    shape = list(entry["shape"])
    if element is not None:
        if not shape or not 0 <= element < shape[0]:
            raise SafetensorsError(f"{path}: {name} {shape} has no element {element}")
        stride = (end - begin) // shape[0]
        begin, end, shape = begin + element * stride, begin + (element + 1) * stride, shape[1:]
    out = torch.empty(end - begin, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(start + begin)
        if f.readinto(memoryview(out.numpy())) != end - begin:
            raise SafetensorsError(f"{path}: the data of {name} is cut short")
    return out.view(getattr(torch, TORCH_DTYPES[entry["dtype"]])).reshape(shape)


def read_scaled(source: SourceTensor, element: Optional[int] = None):
    """-> (the tensor, its scale tensor or None), each read by read_tensor; `element`: only element e
    of a fused [E, ...] tensor (and of its scale when that is [E, ...] too)."""
    scale = None
    if source.scale is not None:
        per_element = element is not None and len(source.scale.shape) > 2 and source.scale.shape[0] == source.shape[0]
        scale = read_tensor(source.scale.file, source.scale.name, element if per_element else None)
    return read_tensor(source.file, source.name, element), scale


class ShardWriter:
    """One safetensors file written tensor by tensor, in the order of `layout` ({name: (torch dtype
    name, shape)}): the header at open, then `write(name, tensor)` for each name in that order
    (contiguous CPU tensors of exactly that dtype and shape). A context manager; `__metadata__` is
    {"format": "pt"} as transformers writes it."""

    def __init__(self, path: Path, layout: dict[str, tuple[str, tuple[int, ...]]]):
        import math

        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, (dtype, shape) in layout.items():
            size = math.prod(shape) * STORED_BYTES[CODES[dtype]]
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors pads it
        self._order = list(layout)
        self._header = header
        self._file = open(path, "wb")
        self._file.write(len(text).to_bytes(8, "little") + text)

    def write(self, name: str, tensor) -> None:
        import torch

        if not self._order or self._order[0] != name:
            raise ValueError(f"{name} written out of order (next: {self._order[:1]})")
        entry = self._header[self._order.pop(0)]
        if list(tensor.shape) != entry["shape"] or CODES[str(tensor.dtype).removeprefix("torch.")] != entry["dtype"]:
            raise ValueError(f"{name}: {tensor.dtype} {list(tensor.shape)}, header says {entry['dtype']} {entry['shape']}")
        self._file.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        if exc[0] is None and self._order:
            raise ValueError(f"{len(self._order)} tensors never written (first: {self._order[0]})")

