"""`--set KEY=VALUE` overrides: parsed as TOML values and applied in order (the last one wins).

An override's origin is OVERRIDE_FILE; its relative paths resolve against the working directory.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Sequence

from dsv4cli.spec.chain import PATH_KEYS, drop_below, resolve_paths
from dsv4cli.spec.problems import OVERRIDE_FILE, Origin, Problem

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def parse_override(item: str) -> tuple[str, Any]:
    """'model.mhc.streams=8' -> ('model.mhc.streams', 8); the value is TOML, else a plain string.

    Raises ValueError with a one-line reason for a malformed item.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(f"expected KEY=VALUE, got {item!r}")
    if not _KEY_RE.match(key):
        raise ValueError(f"{key!r} is not a dotted key like model.mhc.streams")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(data: dict, origins: dict[str, Origin], overrides: Sequence[str], problems: list[Problem]) -> None:
    """Apply each `--set` item to `data` in place (its origins become OVERRIDE_FILE); a bad item
    adds a Problem and is skipped."""
    cwd = Path.cwd()
    for item in overrides:
        try:
            key, value = parse_override(item)
        except ValueError as e:
            problems.append(Problem(OVERRIDE_FILE, None, "", str(e)))
            continue
        if key == "extends":
            problems.append(Problem(OVERRIDE_FILE, None, key, "extends cannot be overridden; edit the spec file"))
            continue
        *parents, leaf = key.split(".")
        node = data
        ok = True
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                parent_key = ".".join(parents[: depth + 1])
                problems.append(Problem(OVERRIDE_FILE, None, key, f"{parent_key} is a value, not a table"))
                ok = False
                break
            node = child
        if not ok:
            continue
        node[leaf] = value
        drop_below(origins, key)
        origins[key] = (OVERRIDE_FILE, None)
        for depth in range(1, len(parents) + 1):
            origins.setdefault(".".join(parents[:depth]), (OVERRIDE_FILE, None))
        if tuple(key.split(".")) in PATH_KEYS:
            section, name = key.split(".")
            resolve_paths({section: node}, cwd)

