"""The variants of a sweep: `--vary KEY=V1,V2,...` lists -> one `--set` list and run directory per variant.

Values are TOML like `--set` values (`4`, `"learned"`, `[1, 2]`, or a bare word taken as a
string), separated by commas outside brackets and quotes. The variants are the cartesian
product of the lists (the first `--vary` varies slowest) or, with `zip`, their pairwise
combination. Each variant's run directory is `DIR/<slug>`, the slug made of the varied keys
(last part, the whole dotted key where two would collide) and values: `streams-2_depth-1`.
No torch import.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dsv4cli.spec.overrides import parse_override

RESERVED_KEYS = ("checkpoint.dir",)
"""Keys the sweep sets itself (each variant trains into DIR/<slug>)."""


class SweepError(ValueError):
    """Bad sweep arguments (exit 2); `.problems` holds one line per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Axis:
    """One `--vary`: the dotted key and its values as typed (`raw`) and as parsed TOML (`values`)."""

    key: str
    raw: tuple[str, ...]
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Variant:
    """One point of the grid: {key: value} and the `KEY=RAW` items that set it."""

    slug: str
    values: dict
    items: tuple[str, ...]
    run_dir: Path

    def overrides(self, set_items: Sequence[str] = ()) -> list[str]:
        """The `--set` list `dsv4 train` gets for this variant: common items, varied items, its run directory."""
        return [*set_items, *self.items, f"checkpoint.dir={json.dumps(str(self.run_dir))}"]


def split_values(raw: str) -> list[str]:
    """'1,2,[3, 4],"a,b"' -> ['1', '2', '[3, 4]', '"a,b"']: commas outside brackets and quotes split."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(raw):
        if quote:
            if ch == quote and raw[i - 1] != "\\":
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    parts.append(raw[start:])
    return [p.strip() for p in parts]


def parse_axis(item: str) -> Axis:
    """'model.mhc.streams=1,2,4' -> Axis; raises ValueError with a one-line reason."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(f"--vary {item!r}: expected KEY=V1,V2,...")
    pieces = split_values(raw)
    if any(not p for p in pieces):
        raise ValueError(f"--vary {key}: empty value in {raw!r}")
    values = []
    for piece in pieces:
        try:
            values.append(parse_override(f"{key}={piece}")[1])
        except ValueError as e:
            raise ValueError(f"--vary {key}: {e}") from None
    seen = [json.dumps(v, sort_keys=True) for v in values]
    dupes = sorted({p for p, s in zip(pieces, seen) if seen.count(s) > 1})
    if dupes:
        raise ValueError(f"--vary {key}: value(s) given twice: {', '.join(dupes)}")
    return Axis(key, tuple(pieces), tuple(values))


def parse_axes(vary: Sequence[str], set_items: Sequence[str] = (), zip_: bool = False) -> list[Axis]:
    """All `--vary` items -> axes; raises SweepError listing every problem."""
    problems, axes = [], []
    for item in vary:
        try:
            axes.append(parse_axis(item))
        except ValueError as e:
            problems.append(f"error: {e}")
    keys = [a.key for a in axes]
    for key in sorted({k for k in keys if keys.count(k) > 1}):
        problems.append(f"error: --vary {key} is given more than once; list all its values in one --vary")
    set_keys = {s.partition("=")[0].strip() for s in set_items}
    for key in RESERVED_KEYS:
        if key in keys or key in set_keys:
            problems.append(f"error: {key} is set by the sweep (DIR/<variant>); choose DIR with --out")
    if not vary:
        problems.append("error: nothing to vary: give at least one --vary KEY=V1,V2,...")
    if zip_ and len({len(a.values) for a in axes}) > 1:
        lengths = ", ".join(f"{a.key} {len(a.values)}" for a in axes)
        problems.append(f"error: --zip needs lists of equal length, got {lengths}")
    if problems:
        raise SweepError(problems)
    return axes


def _label(text: str) -> str:
    """A value or key as a path-safe slug part."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-.") or "x"


def _value_text(raw: str) -> str:
    return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'" else raw


def axis_names(axes: Sequence[Axis]) -> list[str]:
    """Short names of the varied keys: the last part (`streams`), the whole key where two would collide."""
    last = [a.key.rsplit(".", 1)[-1] for a in axes]
    return [_label(a.key if last.count(s) > 1 else s) for a, s in zip(axes, last)]


def variants(axes: Sequence[Axis], out_dir: str | Path, zip_: bool = False) -> list[Variant]:
    """Axes -> the variants, in order, each with its slug and run directory under `out_dir`."""
    names = axis_names(axes)
    indices = zip(*(range(len(a.values)) for a in axes)) if zip_ else \
        itertools.product(*(range(len(a.values)) for a in axes))
    out, used = [], set()
    for point in indices:
        slug = "_".join(f"{n}-{_label(_value_text(a.raw[i]))}" for n, a, i in zip(names, axes, point))[:120]
        if slug in used:  # two values that differ only in characters a path cannot hold
            slug = f"{slug}-{len(out)}"
        used.add(slug)
        out.append(Variant(
            slug=slug,
            values={a.key: a.values[i] for a, i in zip(axes, point)},
            items=tuple(f"{a.key}={a.raw[i]}" for a, i in zip(axes, point)),
            run_dir=Path(out_dir).resolve() / slug,
        ))
    return out
