"""What a checkpoint holds, read from its metadata files only (never from tensor data).

Sources: the DCP `.metadata` (names, global shapes, dtypes, chunks, and where each chunk's bytes
sit), Megatron's `metadata.json`, dsv4's `dsv4_spec.toml` and `dsv4_meta.json`. The `.distcp`
data files are only stat-ed, to tell a truncated checkpoint from a complete one. `.metadata` is
read with torch's DCP reader, or without torch (dsv4cli.ckpt.dcp_pickle, `torch_free`). Megatron's
`common.pt` is not read here; `check_common_state` (used by convert, which copies it) checks it.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dsv4cli.ckpt.errors import CheckpointError
from dsv4cli.ckpt.keys import is_optimizer_key
from dsv4cli.ckpt.layout import (
    COMMON_STATE,
    DCP_METADATA,
    MEGATRON_CONFIG,
    META_FILE,
    SPEC_FILE,
    CheckpointLocation,
    resolve_checkpoint,
)

_METADATA_CLASS = ("torch.distributed.checkpoint.metadata", "Metadata")
# Bytes per element by dtype name, for stand-in dtypes (torch.dtype has .itemsize).
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16, "float8_e4m3fn": 1,
             "float8_e5m2": 1, "uint16": 2, "uint32": 4, "uint64": 8}


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: its checkpoint key, global shape, dtype name, size in bytes and chunk count."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    shards: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_optimizer(self) -> bool:
        return is_optimizer_key(self.name)


@dataclass
class CheckpointInfo:
    """Everything inspect and convert need to know about a checkpoint, from metadata alone."""

    location: CheckpointLocation
    format: str
    tensors: dict[str, TensorEntry]
    objects: list[str]
    files: dict[str, int]
    megatron_config: Optional[dict]
    spec_text: Optional[str]
    spec: Any = None
    spec_error: Optional[str] = None
    meta: Optional[dict] = None
    meta_error: Optional[str] = None
    integrity_problems: list[str] = field(default_factory=list)
    dcp_metadata: Any = None

    @property
    def iter_dir(self) -> Path:
        return self.location.iter_dir

    @property
    def iteration(self) -> Optional[int]:
        if self.location.iteration is not None:
            return self.location.iteration
        if self.meta and isinstance(self.meta.get("iteration"), int):
            return self.meta["iteration"]
        return None

    def model_tensors(self) -> dict[str, TensorEntry]:
        return {k: v for k, v in self.tensors.items() if not v.is_optimizer}

    def optimizer_tensors(self) -> dict[str, TensorEntry]:
        return {k: v for k, v in self.tensors.items() if v.is_optimizer}


def dtype_name(dtype) -> str:
    """torch.float32 -> 'float32'."""
    return str(dtype).removeprefix("torch.")


def read_dcp_metadata(iter_dir: Path, torch_free: bool = False):
    """The DCP `Metadata` object of a checkpoint directory (reads `.metadata` only).

    torch_free: read it with dsv4cli.ckpt.dcp_pickle's stand-ins (no torch import). A global no DCP
    checkpoint holds is a CheckpointError, never unpickled; a file that codec does not know (or cannot
    parse) is read by torch's reader instead, which also words the errors, once dcp_pickle.check_globals
    has read it with the same allow-list. Without torch_free, `.metadata` is trusted (a plain pickle.load)."""
    path = Path(iter_dir) / DCP_METADATA
    if not path.is_file():
        raise CheckpointError(f"{iter_dir}: no {DCP_METADATA} file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (interrupted save?)")
    if torch_free:
        md = _read_torch_free(path)
        if md is not None:
            return md
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(iter_dir)).read_metadata()
    except Exception as e:  # pickle raises many kinds for a damaged file
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})")


def _read_torch_free(path: Path):
    """`.metadata` as dcp_pickle stand-ins; None where torch's reader is needed (a codec gap, damage, or
    a Metadata whose main fields are absent or of other types); CheckpointError for a forbidden global."""
    from dsv4cli.ckpt import dcp_pickle

    def refused(e: "dcp_pickle.Forbidden") -> CheckpointError:
        return CheckpointError(f"{path}: {DCP_METADATA} references {e.name}, which a DCP checkpoint never "
                               "holds; refusing to unpickle it")

    try:
        md, _ = dcp_pickle.load(path)
        if dcp_pickle.global_key(md) == _METADATA_CLASS and _expected_fields(md.__dict__["_state"]):
            return md
    except dcp_pickle.Forbidden as e:
        raise refused(e) from None
    except Exception:  # unknown or damaged: torch's reader decides and words the error
        pass
    try:  # dcp_pickle may have stopped before a forbidden global that pickle.load would reach
        dcp_pickle.check_globals(path)
    except dcp_pickle.Forbidden as e:
        raise refused(e) from None
    except Exception as e:
        raise _unreadable(path, e) from None
    return None


def _expected_fields(state) -> bool:
    """Does a stand-in Metadata's state hold what torch's Metadata has (dict entries, dict or None planner_data)?"""
    return (isinstance(state, dict) and isinstance(state.get("state_dict_metadata"), dict)
            and isinstance(state.get("storage_data"), dict)
            and "planner_data" in state and isinstance(state["planner_data"], (dict, type(None))))


def _tensor_entries(md) -> tuple[dict[str, TensorEntry], list[str]]:
    """By class name: works for torch's classes and dcp_pickle's stand-ins alike."""
    tensors: dict[str, TensorEntry] = {}
    objects: list[str] = []
    for name, item in md.state_dict_metadata.items():
        kind = type(item).__name__
        if kind == "TensorStorageMetadata":
            dtype = item.properties.dtype
            shape = tuple(int(s) for s in item.size)
            itemsize = _itemsize(dtype)
            tensors[name] = TensorEntry(name, shape, dtype_name(dtype), math.prod(shape) * itemsize, len(item.chunks))
        elif kind == "BytesStorageMetadata":
            objects.append(name)
    return tensors, objects


def stored_names(iter_dir: str | Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The tensors {key: global shape} and object names a checkpoint stores (reads `.metadata` only)."""
    tensors, objects = _tensor_entries(read_dcp_metadata(Path(iter_dir)))
    return {k: v.shape for k, v in tensors.items()}, objects


def stored_tensors(iter_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor key -> global shape, from `.metadata` without touching tensor data."""
    return stored_names(iter_dir)[0]


def _itemsize(dtype) -> int:
    size = getattr(dtype, "itemsize", None)  # torch.dtype (torch >= 2.1)
    if isinstance(size, int):
        return size
    name = dtype_name(dtype)
    if name in _ITEMSIZE:
        return _ITEMSIZE[name]
    import torch

    return torch.empty((), dtype=getattr(torch, name)).element_size()


def check_storage(iter_dir: Path, md) -> tuple[dict[str, int], list[str]]:
    """Stat every data file `.metadata` points at: {file: size} and a list of what is missing or short."""
    sizes: dict[str, int] = {}
    needed: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for rel, end in sorted(needed.items()):
        p = Path(iter_dir) / rel
        try:
            sizes[rel] = p.stat().st_size
        except FileNotFoundError:
            problems.append(f"data file {rel} is missing")
            continue
        if sizes[rel] < end:
            problems.append(f"data file {rel} is truncated: {sizes[rel]} bytes, metadata needs {end}")
    return sizes, problems


def check_common_state(path: Path) -> Optional[str]:
    """What is wrong with Megatron's `common.pt` (None when absent or sound), without unpickling it.

    torch.save writes a zip archive: its CRCs tell a damaged or truncated file from a good one.
    A pre-1.6 (non-zip) torch.save file starts with a pickle protocol byte (0x80) and is accepted.
    """
    if not path.is_file():
        return None
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            return f"{COMMON_STATE} is damaged (bad CRC in {bad})" if bad else None
        with open(path, "rb") as f:
            head = f.read(1)
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return f"{COMMON_STATE} unreadable: {e}"
    return None if head == b"\x80" else f"{COMMON_STATE} is not a torch.save file (damaged or truncated)"


def read_checkpoint_info(path: str | Path, location: Optional[CheckpointLocation] = None,
                         torch_free: bool = False) -> CheckpointInfo:
    """Read a checkpoint's metadata (never tensor data) -> CheckpointInfo; CheckpointError if unreadable.
    torch_free: `dcp_metadata` may be dcp_pickle stand-ins (see read_dcp_metadata)."""
    loc = location or resolve_checkpoint(path)
    md = read_dcp_metadata(loc.iter_dir, torch_free)
    tensors, objects = _tensor_entries(md)
    files, integrity = check_storage(loc.iter_dir, md)

    config = None
    cfg_path = loc.iter_dir / MEGATRON_CONFIG
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            integrity.append(f"{MEGATRON_CONFIG} unreadable: {e}")
    fmt = str(config.get("sharded_backend", "torch_dist")) if isinstance(config, dict) else "dcp"

    info = CheckpointInfo(loc, fmt, tensors, objects, files, config, spec_text=None,
                          integrity_problems=integrity, dcp_metadata=md)
    spec_path = loc.iter_dir / SPEC_FILE
    if spec_path.exists():
        try:
            info.spec_text = spec_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            info.spec_error = f"{SPEC_FILE} unreadable: {e}"
        else:
            info.spec, info.spec_error = _load_spec_file(spec_path)
    meta_path = loc.iter_dir / META_FILE
    if meta_path.exists():
        try:
            info.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            info.meta_error = f"{META_FILE} unreadable: {e}"
        else:
            if not isinstance(info.meta, dict):
                info.meta_error = f"{META_FILE} holds {type(info.meta).__name__}, not a JSON object"
                info.meta = None
    return info


def _load_spec_file(path: Path):
    """Saved spec -> (Spec, None) or (None, why). Schema only: the cross-field rules ran when training
    started, and the data/checkpoint paths it names need not exist where the checkpoint is read."""
    from dsv4cli.spec.load import SpecError, load_spec

    try:
        return load_spec(path, rules=False), None
    except SpecError as e:
        return None, "; ".join(_problem_text(path.name, p) for p in e.problems)


def _problem_text(file_name: str, problem) -> str:
    """'dsv4_spec.toml:12: model.hidden_size: message' (the directory is said elsewhere)."""
    line = getattr(problem, "line", None)
    key = getattr(problem, "key", "")
    where = f"{file_name}:{line}" if line else file_name
    return f"{where}: {key}: {problem.message}" if key else f"{where}: {problem.message}"


def data_file_names(iter_dir: Path) -> list[str]:
    """Names of the DCP data files in a directory (for tests and copying)."""
    return sorted(f for f in os.listdir(iter_dir) if f.endswith(".distcp"))
