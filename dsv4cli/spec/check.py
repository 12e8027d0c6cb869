"""Validate one spec end to end: resolve, schema, cross-field rules, unsupported features, estimates.

This is the library behind `dsv4 validate` (and the validation `dsv4 train` runs first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from dsv4cli.spec.problems import Problem
from dsv4cli.spec.schema import Spec


@dataclass
class SpecReport:
    """Outcome of checking one spec: errors and warnings; the spec when it resolved."""

    path: str
    spec: Optional[Spec]
    world_size: Optional[int]
    overrides: list[str] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.errors


def check_spec(
    path: str,
    overrides: Sequence[str] = (),
    world_size: Optional[int] = None,
    *,
    unsupported_are_errors: bool = False,
    world_rules: bool = True,
) -> SpecReport:
    """Every problem of the spec at `path` (+ overrides) for `world_size` processes (None = launch's).

    `unsupported_are_errors=True` (what `dsv4 train` uses) turns the not-yet-supported features
    of `rules.UNSUPPORTED` into errors; `world_rules=False` skips the rules that need the world size.
    """
    from dsv4cli.spec.layout import default_world_size
    from dsv4cli.spec.load import resolve_partial
    from dsv4cli.spec.rules import check_rules, unsupported_features

    spec, schema_problems = resolve_partial(path, overrides)
    report = SpecReport(str(path), None, world_size, list(overrides), errors=list(schema_problems))
    if spec is None:
        return report
    report.world_size = world_size or default_world_size(spec)
    rejected = {p.key for p in schema_problems if p.key}
    unsupported = set(unsupported_features(spec))
    for problem in check_rules(spec, report.world_size, world_rules=world_rules):
        if rejected and _mentions(problem, rejected):
            continue
        if unsupported_are_errors and problem in unsupported:
            problem = Problem(problem.file, problem.line, problem.key, problem.message, "error")
        (report.errors if problem.severity == "error" else report.warnings).append(problem)
    if not report.errors:
        report.spec = spec
    return report


def _mentions(problem: Problem, keys: set[str]) -> bool:
    """Does a rule problem involve a key whose value the schema already rejected?"""
    return any(problem.key == k or problem.key.startswith(k + ".") or ("." in k and k in problem.message)
               for k in keys)


def summary(report: SpecReport) -> dict:
    """JSON-ready summary of a valid report: resolved spec, estimates, torchrun command."""
    from dsv4cli.spec.estimate import estimate
    from dsv4cli.spec.launch_cmd import torchrun_command

    assert report.spec is not None
    spec = report.spec
    return {
        "spec": spec.model_dump(mode="json", exclude={"extends"}),
        **estimate(spec, report.world_size).to_json(),
        "torchrun": torchrun_command(spec, report.path, overrides=report.overrides),
    }
