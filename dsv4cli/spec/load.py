"""Load a spec file into a validated `Spec` (PROVISIONAL minimal version; the spec issue replaces
the internals: extends chains, --set overrides, line numbers, all problems at once).

Public contract (other layers rely on it):
    load_spec(path, overrides=()) -> Spec          raises SpecError on any bad input
    spec_to_toml(spec) -> str                      the fully resolved spec as TOML text
    SpecError.problems -> list[Problem(file, line, key, message)]
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from dsv4cli.spec.schema import Spec


@dataclass(frozen=True)
class Problem:
    file: str
    line: Optional[int]
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class SpecError(Exception):
    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SpecError([Problem(str(path), None, "", str(e))]) from None
    for item in overrides:
        key, _, raw = item.partition("=")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    from pydantic import ValidationError

    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(
            [Problem(str(path), None, ".".join(map(str, err["loc"])), err["msg"]) for err in e.errors()]
        ) from None


def spec_to_toml(spec: Spec) -> str:
    """Minimal TOML writer for the resolved spec (tables of scalars and arrays)."""
    import json

    def emit(prefix: str, table: dict, out: list[str]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and scalars:
            out.append(f"[{prefix}]")
        for k, v in scalars.items():
            out.append(f"{k} = {json.dumps(v)}")
        if scalars:
            out.append("")
        for k, v in subs.items():
            emit(f"{prefix}.{k}" if prefix else k, v, out)

    out: list[str] = []
    emit("", spec.model_dump(mode="json"), out)
    return "\n".join(out)
