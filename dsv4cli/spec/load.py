"""Load a spec file into a validated `Spec`: `extends` chains, `--set` overrides, line numbers.

Public contract (other layers rely on it):
    load_spec(path, overrides=()) -> Spec          raises SpecError on any bad input
    spec_to_toml(spec) -> str                      the fully resolved spec as TOML text
    SpecError.problems -> list[Problem(file, line, key, message)]

Resolution order: the `extends` chain (base first; a derived file overrides single keys,
tables merge key by key, arrays are replaced whole), then `--set KEY=VALUE` overrides in
order (the last one wins). Relative paths (`extends`, `data.paths`, `data.tokenizer` when
not "byte", `checkpoint.dir`, `checkpoint.load`) resolve against the directory of the file
that sets them (the working directory for `--set`) and come out absolute. Every key keeps
its origin (file, line), so each problem points at the line that set the offending value.
Types are checked strictly (TOML has real types): "2", 2.0 or true where an integer belongs,
or "yes" where a boolean belongs, are errors rather than silently converted.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Optional, Sequence

from dsv4cli.spec.problems import OVERRIDE_FILE, Problem, SpecError
from dsv4cli.spec.schema import Spec
from dsv4cli.spec.toml_lines import key_lines

__all__ = [
    "OVERRIDE_FILE", "Problem", "SpecError", "load_spec", "locate", "parse_override", "resolve_partial",
    "resolve_spec", "spec_to_toml",
]

Origin = tuple[str, Optional[int]]
"""(file as shown to the user, 1-based line or None)."""

PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("data", "paths"),
    ("data", "tokenizer"),
    ("checkpoint", "dir"),
    ("checkpoint", "load"),
)
"""Keys whose relative paths resolve against the file that sets them."""

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_TOML_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)")


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def load_spec(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    world_size: Optional[int] = None,
    rules: bool = True,
) -> Spec:
    """Spec file (+ `--set` overrides) -> validated Spec; raises SpecError listing every error.

    `rules=True` also applies the cross-field rules of `dsv4cli.spec.rules`; the rules that
    need the world size (dp, expert grid, global batch) run only when `world_size` is given.
    Warnings never raise; `dsv4cli.spec.check.check_spec` returns them.
    """
    if not rules:
        return resolve_spec(path, overrides)
    from dsv4cli.spec.check import check_spec

    report = check_spec(str(path), overrides, world_size, world_rules=world_size is not None)
    if report.errors:
        raise SpecError(report.errors)
    assert report.spec is not None
    return report.spec


def resolve_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Spec file (+ overrides) -> Spec validated by the schema only (no cross-field rules).

    The returned Spec has `extends = None` (the chain is merged in), `name` defaulted to the
    file's stem, absolute paths, and the origin of every key (see `locate`).
    """
    spec, problems = resolve_partial(path, overrides)
    if problems:
        raise SpecError(problems)
    assert spec is not None
    return spec


def resolve_partial(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Optional[Spec], list[Problem]]:
    """Like `resolve_spec`, but returns (spec, problems) instead of raising.

    When the schema rejects some values, they are dropped (defaults take their place) and the
    spec is validated again, so the cross-field rules can still run and every problem is
    reported at once; that spec comes back alongside the problems (None if even that fails).
    """
    problems: list[Problem] = []
    root = str(path)
    resolved = _read_chain(Path(path), root, problems, stack=())
    if resolved is None:
        return None, problems
    data, origins = resolved
    _apply_overrides(data, origins, overrides, problems)
    data.pop("extends", None)
    origins = {k: v for k, v in origins.items() if k != "extends"}
    problems.extend(_drop_non_finite(data, origins, root))

    from pydantic import ValidationError

    spec: Optional[Spec] = None
    try:
        spec = Spec.model_validate(data, strict=True)
    except ValidationError as e:
        problems.extend(_pydantic_problems(e, data, origins, root))
        spec = _validate_pruned(data, e)
    if spec is not None:
        if spec.name is None:
            spec.name = Path(path).stem
        spec._origins = origins
        spec._root = root
    return spec, _dedupe(problems)


def _drop_non_finite(data: dict, origins: dict[str, Origin], root: str, prefix: str = "") -> list[Problem]:
    """TOML allows inf and nan; no spec value means either. Report each, drop it (its default stands in)."""
    problems = []
    for key in list(data):
        value, dotted = data[key], f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            problems += _drop_non_finite(value, origins, root, dotted)
        elif isinstance(value, float) and not math.isfinite(value):
            file, line = _locate(origins, dotted, root)
            problems.append(Problem(file, line, dotted, f"must be a finite number, got {value}"))
            del data[key]
        elif isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            file, line = _locate(origins, dotted, root)
            problems.append(Problem(file, line, dotted, f"must hold finite numbers, got {_short(value)}"))
            del data[key]
    return problems


def _validate_pruned(data: dict, error) -> Optional[Spec]:
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


def locate(spec: Spec, key: str) -> Origin:
    """(file, line) of the file line that set `key` (or its nearest set parent table)."""
    origins: dict[str, Origin] = getattr(spec, "_origins", None) or {}
    root = getattr(spec, "_root", None) or "<spec>"
    return _locate(origins, key, root)


def spec_to_toml(spec: Spec) -> str:
    """Resolved Spec -> TOML text that loads back to the same Spec (tables of scalars and arrays)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    def emit(prefix: str, table: dict, out: list[str]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix:
            out.append(f"[{prefix}]")
        for k, v in scalars.items():
            out.append(f"{k} = {value(v)}")
        if scalars or prefix:
            out.append("")
        for k, v in subs.items():
            emit(f"{prefix}.{k}" if prefix else k, v, out)

    out: list[str] = []
    emit("", spec.model_dump(mode="json", exclude={"extends"}), out)
    return "\n".join(out).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------
# files and the extends chain
# ---------------------------------------------------------------------------------------------
def _shown(path: Path, root_path: Path, root: str) -> str:
    """How a file is named in messages: the root as the user typed it, others relative to cwd."""
    if path == root_path:
        return root
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else rel


def _read_chain(
    path: Path, root: str, problems: list[Problem], stack: tuple[Path, ...], referrer: Optional[Origin] = None
) -> Optional[tuple[dict, dict[str, Origin]]]:
    """Read `path` and its `extends` chain -> (merged data, origins), or None after a problem."""
    absolute = Path(os.path.abspath(path))
    root_path = Path(os.path.abspath(root))
    shown = _shown(absolute, root_path, root)
    where_file, where_line = referrer if referrer else (shown, None)
    where_key = "extends" if referrer else ""

    if absolute in stack:
        chain = " -> ".join(_shown(p, root_path, root) for p in stack + (absolute,))
        problems.append(Problem(where_file, where_line, where_key, f"cycle: {chain}"))
        return None
    try:
        text = absolute.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(Problem(where_file, where_line, where_key, f"file not found: {shown}"))
        return None
    except (OSError, UnicodeDecodeError) as e:
        problems.append(Problem(where_file, where_line, where_key, f"cannot read {shown}: {e}"))
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problems.append(_toml_problem(shown, text, e))
        return None

    lines = key_lines(text)
    origins: dict[str, Origin] = {".".join(k): (shown, line) for k, line in lines.items()}
    _resolve_paths(data, absolute.parent)

    base = data.get("extends")
    if base is None:
        return data, origins
    if not isinstance(base, str) or not base:
        problems.append(Problem(shown, origins.get("extends", (shown, None))[1], "extends", "must be a file path (string)"))
        return None
    base_path = absolute.parent / os.path.expanduser(base)
    resolved = _read_chain(base_path, root, problems, stack + (absolute,), referrer=origins.get("extends", (shown, None)))
    if resolved is None:
        return None
    merged, merged_origins = resolved
    _merge(merged, merged_origins, data, origins, ())
    return merged, merged_origins


def _toml_problem(shown: str, text: str, e: tomllib.TOMLDecodeError) -> Problem:
    """Malformed TOML -> Problem at its line, naming the key of that line when there is one."""
    message = str(e)
    m = _TOML_POS_RE.search(message)
    if not m:
        return Problem(shown, None, "", f"malformed TOML: {message}")
    line, column = int(m.group(1)), int(m.group(2))
    reason = message[: m.start()].strip()
    where = f"line {line}, column {column}"
    if reason == "Unclosed array":
        # tomllib stops where the array should have closed; blame the line that opened it
        opened = _array_opening_line(text, line)
        if opened is not None and opened != line:
            where = f"opened on line {opened}; the parser stopped at line {line}, column {column}"
            line = opened
    key = _key_at_line(text, line)
    return Problem(shown, line, key, f"malformed TOML: {reason} ({where})")


def _array_opening_line(text: str, line: int) -> Optional[int]:
    """The last line at or before `line` that starts a `key = [` array."""
    lines = text.splitlines()
    for i in range(min(line, len(lines)), 0, -1):
        if re.match(r"^\s*[A-Za-z0-9_.\-\"' ]+=\s*\[", lines[i - 1]):
            return i
    return None


def _key_at_line(text: str, line: int) -> str:
    """Best-effort dotted key of the `key = value` on `line` (within its [table])."""
    table = ""
    for i, raw in enumerate(text.splitlines()[:line], start=1):
        stripped = raw.strip()
        header = re.match(r"^\[\[?\s*([A-Za-z0-9_.\- ]+)", stripped)
        if header:
            table = header.group(1).replace(" ", "")
            if i == line:
                return table
            continue
        if i == line:
            m = re.match(r"^([A-Za-z0-9_.\-]+)\s*=", stripped)
            if m:
                return f"{table}.{m.group(1)}" if table else m.group(1)
    return ""


def _resolve_paths(data: dict, base_dir: Path) -> None:
    """Make the relative paths of PATH_KEYS absolute against `base_dir` (in place)."""

    def absolute(p: str) -> str:
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))

    for section, key in PATH_KEYS:
        table = data.get(section)
        if not isinstance(table, dict) or key not in table:
            continue
        value = table[key]
        if (section, key) == ("data", "tokenizer"):
            if isinstance(value, str) and value != "byte" and value:
                table[key] = absolute(value)
        elif isinstance(value, str) and value:
            table[key] = absolute(value)
        elif isinstance(value, list):
            table[key] = [absolute(v) if isinstance(v, str) and v else v for v in value]


def _merge(base: dict, base_origins: dict[str, Origin], over: dict, over_origins: dict[str, Origin], prefix: tuple) -> None:
    """Deep-merge `over` into `base` (tables key by key, everything else replaced whole)."""
    for key, value in over.items():
        path = prefix + (key,)
        dotted = ".".join(path)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            if dotted in over_origins:
                base_origins[dotted] = over_origins[dotted]
            _merge(base[key], base_origins, value, over_origins, path)
            continue
        _drop_below(base_origins, dotted)
        base[key] = copy.deepcopy(value)
        for k, origin in over_origins.items():
            if k == dotted or k.startswith(dotted + "."):
                base_origins[k] = origin


def _drop_below(origins: dict[str, Origin], dotted: str) -> None:
    for k in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
        del origins[k]


# ---------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------
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


def _apply_overrides(data: dict, origins: dict[str, Origin], overrides: Sequence[str], problems: list[Problem]) -> None:
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
        _drop_below(origins, key)
        origins[key] = (OVERRIDE_FILE, None)
        for depth in range(1, len(parents) + 1):
            origins.setdefault(".".join(parents[:depth]), (OVERRIDE_FILE, None))
        if tuple(key.split(".")) in PATH_KEYS:
            section, name = key.split(".")
            _resolve_paths({section: node}, cwd)


# ---------------------------------------------------------------------------------------------
# pydantic errors -> problems
# ---------------------------------------------------------------------------------------------
def _locate(origins: dict[str, Origin], key: str, root: str) -> Origin:
    parts = key.split(".") if key else []
    while parts:
        origin = origins.get(".".join(parts))
        if origin is not None:
            return origin
        parts.pop()
    return (root, None)


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


def _short(value: Any) -> str:
    """A value as the user wrote it in TOML (true, "text", 3), cut at 60 characters."""
    text = ("true" if value else "false") if isinstance(value, bool) else (
        json.dumps(value) if isinstance(value, str) else repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


_TABLE_ERRORS = ("model_type", "model_attributes_type", "dict_type")
"""Pydantic error types of a value given where a section (TOML table) belongs."""


def _pydantic_problems(e, data: dict, origins: dict[str, Origin], root: str) -> list[Problem]:
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
            message = f"must be a table ([{key}] or {{ ... }}), got {_short(err.get('input'))}"
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                message = msg[len("Value error, ") :]
            else:
                message = f"{msg[0].lower()}{msg[1:]}, got {_short(err.get('input'))}"
        file, line = _locate(origins, key, root)
        problems.append(Problem(file, line, key, message))
    return problems


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.file, p.line, p.key, p.message) not in seen:
            seen.add((p.file, p.line, p.key, p.message))
            out.append(p)
    return out
