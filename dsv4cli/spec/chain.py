"""Read a spec file and its `extends` chain: merged data, the origin (file, line) of every key.

A derived file overrides single keys of its base, tables merge key by key, arrays are replaced
whole. Relative paths of PATH_KEYS resolve against the directory of the file that sets them.
Unreadable files, cycles and malformed TOML become Problems at the line that caused them.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from pathlib import Path
from typing import Optional

from dsv4cli.spec.problems import Origin, Problem
from dsv4cli.spec.toml_lines import key_lines

PATH_KEYS: tuple[tuple[str, ...], ...] = (
    ("data", "paths"),
    ("data", "tokenizer"),
    ("checkpoint", "dir"),
    ("checkpoint", "load"),
)
"""Keys whose relative paths resolve against the file that sets them."""

_TOML_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)")


def _shown(path: Path, root_path: Path, root: str) -> str:
    """How a file is named in messages: the root as the user typed it, others relative to cwd."""
    if path == root_path:
        return root
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else rel


def read_chain(
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
    resolve_paths(data, absolute.parent)

    base = data.get("extends")
    if base is None:
        return data, origins
    if not isinstance(base, str) or not base:
        problems.append(Problem(shown, origins.get("extends", (shown, None))[1], "extends", "must be a file path (string)"))
        return None
    base_path = absolute.parent / os.path.expanduser(base)
    resolved = read_chain(base_path, root, problems, stack + (absolute,), referrer=origins.get("extends", (shown, None)))
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


def resolve_paths(data: dict, base_dir: Path) -> None:
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
        drop_below(base_origins, dotted)
        base[key] = copy.deepcopy(value)
        for k, origin in over_origins.items():
            if k == dotted or k.startswith(dotted + "."):
                base_origins[k] = origin


def drop_below(origins: dict[str, Origin], dotted: str) -> None:
    for k in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
        del origins[k]

