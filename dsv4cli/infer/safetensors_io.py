"""Reading a safetensors directory one tensor at a time (the `safetensors` package; nothing is written).

    HF_DIR/model.safetensors                                  one file, or
    HF_DIR/model.safetensors.index.json {"weight_map": {name: file}} + the files it names

`tensor_sources` lists every tensor with its file from the headers alone; `stream` loads them one by one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

INDEX_FILE = "model.safetensors.index.json"


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
