"""Pydantic's validation errors -> Problems at the line that set each value (did-you-mean for unknown keys).

Also the two repairs that let every problem be reported at once: non-finite numbers are dropped
before validation, and values the schema rejected are dropped for a second validation.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
from typing import Any, Optional, Sequence

from dsv4cli.spec.problems import Origin, Problem, origin_of
from dsv4cli.spec.schema import Spec


def drop_non_finite(data: dict, origins: dict[str, Origin], root: str, prefix: str = "") -> list[Problem]:
    """TOML allows inf and nan; no spec value means either. Report each, drop it (its default stands in)."""
    problems = []
    for key in list(data):
        value, dotted = data[key], f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            problems += drop_non_finite(value, origins, root, dotted)
        elif isinstance(value, float) and not math.isfinite(value):
            file, line = origin_of(origins, dotted, root)
            problems.append(Problem(file, line, dotted, f"must be a finite number, got {value}"))
            del data[key]
        elif isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            file, line = origin_of(origins, dotted, root)
            problems.append(Problem(file, line, dotted, f"must hold finite numbers, got {shown_value(value)}"))
            del data[key]
    return problems


def validate_pruned(data: dict, error) -> Optional[Spec]:
    """Validate `data` without the values `error` rejected (None when that is not enough)."""
    from pydantic import ValidationError

    pruned = copy.deepcopy(data)
    for err in error.errors(include_url=False):
        if err["type"] == "missing":
            return None
        keys = list(itertools.takewhile(lambda part: isinstance(part, str), _clean_loc(err["loc"], data)))
        node = pruned
        for part in keys[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys:
            node.pop(keys[-1], None)
    try:
        return Spec.model_validate(pruned, strict=True)
    except ValidationError:
        return None


def _clean_loc(loc: tuple, data: Any) -> list:
    """Pydantic loc -> the keys/indices that exist in the input (drops union-branch tags)."""
    out: list = []
    node = data
    for el in loc:
        if isinstance(node, dict) and isinstance(el, str):
            out.append(el)
            node = node.get(el)
        elif isinstance(node, list) and isinstance(el, int):
            out.append(el)
            node = node[el] if 0 <= el < len(node) else None
        elif node is None and isinstance(el, str) and not out:
            out.append(el)
    return out


def _section_model(path: Sequence[str]):
    """The pydantic model class of the table at `path` (None if it is not a table)."""
    from pydantic import BaseModel
    from typing import get_args

    cls: Any = Spec
    for part in path:
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *get_args(ann)]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return None
    return cls


def unknown_key_message(path: Sequence[str]) -> str:
    """'unknown key' + a did-you-mean suggestion from the keys valid at that depth."""
    *parents, leaf = [str(p) for p in path]
    cls = _section_model(parents)
    table = f"[{'.'.join(parents)}]" if parents else "the top level"
    if cls is None:
        return f"unknown key in {table}"
    valid = list(cls.model_fields)
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key in {table}; did you mean '{close[0]}'?"
    return f"unknown key in {table}; valid keys: {', '.join(valid)}"


def shown_value(value: Any) -> str:
    """A value as the user wrote it in TOML (true, "text", 3), cut at 60 characters."""
    text = ("true" if value else "false") if isinstance(value, bool) else (
        json.dumps(value) if isinstance(value, str) else repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


_TABLE_ERRORS = ("model_type", "model_attributes_type", "dict_type")
"""Pydantic error types of a value given where a section (TOML table) belongs."""


def pydantic_problems(e, data: dict, origins: dict[str, Origin], root: str) -> list[Problem]:
    """A pydantic ValidationError over `data` -> one Problem per error, at the line that set the value."""
    problems = []
    for err in e.errors(include_url=False):
        path = _clean_loc(err["loc"], data)
        key = ".".join(str(p) for p in path)
        kind = err["type"]
        if kind == "extra_forbidden":
            message = unknown_key_message(path)
        elif kind == "missing":
            message = "required key is missing"
        elif kind in _TABLE_ERRORS:
            message = f"must be a table ([{key}] or {{ ... }}), got {shown_value(err.get('input'))}"
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                message = msg[len("Value error, ") :]
            else:
                message = f"{msg[0].lower()}{msg[1:]}, got {shown_value(err.get('input'))}"
        file, line = origin_of(origins, key, root)
        problems.append(Problem(file, line, key, message))
    return problems


def dedupe(problems: list[Problem]) -> list[Problem]:
    """`problems` in their order, each distinct one once."""
    seen, out = set(), []
    for p in problems:
        if (p.file, p.line, p.key, p.message) not in seen:
            seen.add((p.file, p.line, p.key, p.message))
            out.append(p)
    return out
