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

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from dsv4cli.spec.chain import read_chain
from dsv4cli.spec.overrides import apply_overrides, parse_override
from dsv4cli.spec.problems import OVERRIDE_FILE, Origin, Problem, SpecError, origin_of
from dsv4cli.spec.schema import Spec
from dsv4cli.spec.schema_problems import dedupe, drop_non_finite, pydantic_problems, validate_pruned

__all__ = [
    "OVERRIDE_FILE", "Problem", "SpecError", "load_spec", "locate", "parse_override", "resolve_partial",
    "resolve_spec", "spec_to_toml",
]


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
    resolved = read_chain(Path(path), root, problems, stack=())
    if resolved is None:
        return None, problems
    data, origins = resolved
    apply_overrides(data, origins, overrides, problems)
    data.pop("extends", None)
    origins = {k: v for k, v in origins.items() if k != "extends"}
    problems.extend(drop_non_finite(data, origins, root))

    from pydantic import ValidationError

    spec: Optional[Spec] = None
    try:
        spec = Spec.model_validate(data, strict=True)
    except ValidationError as e:
        problems.extend(pydantic_problems(e, data, origins, root))
        spec = validate_pruned(data, e)
    if spec is not None:
        if spec.name is None:
            spec.name = Path(path).stem
        spec._origins = origins
        spec._root = root
    return spec, dedupe(problems)


def locate(spec: Spec, key: str) -> Origin:
    """(file, line) of the file line that set `key` (or its nearest set parent table)."""
    origins: dict[str, Origin] = getattr(spec, "_origins", None) or {}
    root = getattr(spec, "_root", None) or "<spec>"
    return origin_of(origins, key, root)


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
