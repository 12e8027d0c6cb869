"""Read and write PyTorch DCP `.metadata` (a pickle of torch's `Metadata`) without importing torch.

`load(path)` unpickles with stand-ins for every torch / megatron global: each global becomes a
`Global` class that remembers its (module, qualname); an object built from one becomes a `StandIn`
that remembers how it was built (NEWOBJ args or REDUCE args) and the state BUILD gave it.
`dump(obj, path)` pickles such a graph back with the same globals, the same build steps and the
same states, so torch's own `pickle.load` of the result gives the objects torch would have; an
unchanged graph is written back byte for byte (same protocol, same memo, same frames).

Attribute access works on stand-ins as on torch's dataclasses (`md.storage_data`,
`item.properties.dtype`, `index.fqn`), and `replace(obj, **changes)` is `dataclasses.replace` for
both. A global outside torch / megatron and a few harmless stdlib ones raises `Forbidden` (no DCP
`.metadata` holds one: never unpickle that file with a plain loader); anything else this codec does
not know (keyword NEWOBJ, ...) raises `Unsupported`: callers then use torch's reader instead, after
`check_globals` (the real globals, the same allow-list) has read the file once.
"""

from __future__ import annotations

import copyreg
import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

STANDIN_PACKAGES = ("torch", "megatron")
# Globals outside those packages a DCP `.metadata` may hold (StorageMeta.checkpoint_id is a path).
_SAFE_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("collections", "OrderedDict"), ("collections", "defaultdict"),
    ("_codecs", "encode"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}
# Dataclasses whose __getstate__ is a tuple: field names, in order (torch.distributed.checkpoint.metadata).
TUPLE_FIELDS = {
    ("torch.distributed.checkpoint.metadata", "TensorProperties"):
        ("dtype", "layout", "requires_grad", "memory_format", "pin_memory"),
}


class Unsupported(Exception):
    """The pickle holds something the codec does not stand in for (use torch's reader instead)."""


class Forbidden(Exception):
    """The pickle names a global no DCP `.metadata` holds (`name`: 'module.qualname'): refuse the file."""

    def __init__(self, name: str):
        super().__init__(f"global {name}")
        self.name = name


def allowed(module: str, name: str) -> bool:
    """May a DCP `.metadata` name the global module.name? (torch.*, megatron.*, _SAFE_GLOBALS)"""
    return module.split(".")[0] in STANDIN_PACKAGES or (module, name) in _SAFE_GLOBALS


class Global(type):
    """Metaclass of the stand-in classes: one per (module, qualname) met in one pickle."""

    def __repr__(cls) -> str:
        return f"{cls.module}.{cls.qualname}"

    @property
    def key(cls) -> tuple[str, str]:
        return (cls.module, cls.qualname)


class StandIn:
    """An object a pickle built from a stand-in global: `_kind` 'new' (NEWOBJ) or 'call' (REDUCE),
    `_args` the arguments, `_state` what BUILD set (None if nothing)."""

    module: str
    qualname: str

    def __new__(cls, *args):
        self = object.__new__(cls)
        self.__dict__.update(_kind="new", _args=args, _state=None)
        return self

    def __init__(self, *args):  # only a REDUCE calls the class
        self.__dict__.update(_kind="call", _args=args)

    def __setstate__(self, state) -> None:
        self.__dict__["_state"] = state

    def __reduce_ex__(self, protocol):
        d = self.__dict__
        if d["_kind"] == "new":
            return (copyreg.__newobj__, (type(self), *d["_args"]), d["_state"])
        return (type(self), d["_args"], d["_state"])

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        state = self.__dict__.get("_state")
        if isinstance(state, dict) and name in state:
            return state[name]
        fields = TUPLE_FIELDS.get(type(self).key)
        if isinstance(state, tuple) and fields and len(fields) == len(state) and name in fields:
            return state[fields.index(name)]
        raise AttributeError(f"{type(self).key} stand-in has no {name!r}")

    def __repr__(self) -> str:
        d = self.__dict__
        return f"{type(self)!r}<{d['_kind']} {d['_args']!r} {d['_state']!r}>"


class SizeStandIn(StandIn):
    """torch.Size((2, 3)) (pickled as a REDUCE of torch.Size on a tuple): iterates like one."""

    def __iter__(self):
        return iter(self.__dict__["_args"][0])

    def __len__(self) -> int:
        return len(self.__dict__["_args"][0])


def standin_class(module: str, qualname: str) -> Global:
    """A new stand-in class for the global module.qualname."""
    base = SizeStandIn if (module, qualname) == ("torch", "Size") else StandIn
    return Global(qualname.rpartition(".")[2], (base,), {"module": module, "qualname": qualname})


def is_standin(obj: Any) -> bool:
    return isinstance(obj, StandIn) or isinstance(obj, Global)


def global_key(obj: Any) -> tuple[str, str] | None:
    """(module, qualname) of a stand-in global or of a stand-in object's class; None otherwise."""
    if isinstance(obj, Global):
        return obj.key
    if isinstance(obj, StandIn):
        return type(obj).key
    return None


def call(cls: Global, *args) -> StandIn:
    """What a REDUCE of cls(*args) builds (torch.Size((2, 3)), an enum member, ...)."""
    obj = StandIn.__new__(cls)
    obj.__init__(*args)
    return obj


def call_args(obj: StandIn) -> tuple:
    return obj.__dict__["_args"]


def replace(obj: Any, **changes) -> Any:
    """dataclasses.replace for torch's dataclasses and their stand-ins (a dict state with those keys)."""
    if not isinstance(obj, StandIn):
        return dataclasses.replace(obj, **changes)
    state = obj.__dict__["_state"]
    if not isinstance(state, dict) or not set(changes) <= set(state):
        raise Unsupported(f"cannot replace {sorted(changes)} in {type(obj)!r}")
    new = StandIn.__new__(type(obj), *obj.__dict__["_args"])
    new.__dict__["_kind"] = obj.__dict__["_kind"]
    new.__setstate__({**state, **changes})
    return new


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: BinaryIO):
        super().__init__(f)
        self._classes: dict[tuple[str, str], Global] = {}

    def find_class(self, module: str, name: str):
        if not allowed(module, name):
            raise Forbidden(f"{module}.{name}")
        if module.split(".")[0] in STANDIN_PACKAGES:
            key = (module, name)
            if key not in self._classes:
                self._classes[key] = standin_class(module, name)
            return self._classes[key]
        return super().find_class(module, name)


class _CheckingUnpickler(pickle.Unpickler):
    """The plain unpickler (real torch classes) for allowed globals only."""

    def find_class(self, module: str, name: str):
        if not allowed(module, name):
            raise Forbidden(f"{module}.{name}")
        return super().find_class(module, name)


def check_globals(path: str | Path) -> None:
    """Unpickle `path` with the real globals of the allow-list (imports torch): Forbidden if it names
    another one, whatever pickle raises if it is damaged. Run before a plain `pickle.load` of a file
    `load` could not read (it may stop before reaching a forbidden global)."""
    with open(path, "rb") as f:
        _CheckingUnpickler(f).load()


def _protocol(head: bytes) -> int:
    return head[1] if len(head) >= 2 and head[0] == pickle.PROTO[0] else 0


def loads(data: bytes) -> tuple[Any, int]:
    """Unpickle with stand-ins -> (object graph, protocol of the pickle)."""
    try:
        obj = _Unpickler(io.BytesIO(data)).load()
    except TypeError as e:  # e.g. NEWOBJ_EX keyword arguments
        raise Unsupported(str(e)) from None
    return obj, _protocol(data[:2])


def load(path: str | Path) -> tuple[Any, int]:
    return loads(Path(path).read_bytes())


class Pickler(pickle._Pickler):
    """The pure-Python pickler, writing stand-in globals as the globals they stand for."""

    def save_global(self, obj, name=None):
        if not isinstance(obj, Global) or name is not None:
            return super().save_global(obj, name)
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + obj.module.encode("utf-8") + b"\n" + obj.qualname.encode("utf-8") + b"\n")
        self.memoize(obj)


def dumps(obj: Any, protocol: int) -> bytes:
    buf = io.BytesIO()
    Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def dump(obj: Any, path: str | Path, protocol: int) -> None:
    Path(path).write_bytes(dumps(obj, protocol))
