"""Validate every variant of a sweep, then train them one by one with the `dsv4 train` machinery.

Each variant is a `dsv4 train SPEC --set ...` run: `plan_launch` validates it (the rules and
messages of `dsv4 validate`) and builds its torchrun argv, the preflight checks of `dsv4 train`
run before anything trains, and a variant trains in-process for one process or under
`run_torchrun` otherwise. A variant is finished when its run directory's latest checkpoint has
reached `train.steps`; a re-run skips finished variants and resumes the others from their
checkpoints. A variant that ends unfinished with exit 0 was stopped (Ctrl-C, SIGTERM,
`train.exit_interval`) after saving: the sweep stops there too.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from dsv4cli.spec.launch_cmd import shell_join
from dsv4cli.sweep.grid import Axis, SweepError, Variant, parse_axes, variants

VARIANT_SPEC = "spec.toml"
"""The resolved spec of a variant, in its run directory."""
VARIANT_RECORD = "sweep.json"
"""{"set", "spec", "overrides", "wall_s"} of a variant, in its run directory (wall_s adds up over re-runs)."""


@dataclass
class SweepPlan:
    """A validated sweep: the variants and, for each, the `dsv4 train` launch plan."""

    spec_path: str
    out_dir: Path
    axes: list[Axis]
    variants: list[Variant]
    plans: list = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter(zip(self.variants, self.plans))


@dataclass
class SweepOutcome:
    """How a sweep run ended: exit codes of failed variants, and whether it stopped before the end."""

    failed: dict = field(default_factory=dict)
    stopped_at: Optional[str] = None

    @property
    def exit_code(self) -> int:
        return max(self.failed.values(), default=0)


def default_out_dir(spec_path: str, set_items: Sequence[str] = ()) -> Path:
    """sweeps/<spec name> (the name after `--set`; the file's stem when the spec does not resolve)."""
    from dsv4cli.spec.load import resolve_partial

    spec, _ = resolve_partial(spec_path, set_items)
    return Path("sweeps") / (spec.name if spec is not None and spec.name else Path(spec_path).stem)


def per_variant(lines_per_variant: Sequence[Sequence[str]], vs: Sequence[Variant]) -> list[str]:
    """Problem lines of every variant -> one list: a line all variants share once, the others
    prefixed with `variant <slug>: `."""
    shared = set.intersection(*(set(lines) for lines in lines_per_variant)) if len(vs) > 1 else set()
    out = [line for line in dict.fromkeys(lines_per_variant[0]) if line in shared] if shared else []
    for v, lines in zip(vs, lines_per_variant):
        out += [f"variant {v.slug}: {line}" for line in lines if line not in shared]
    return out


def plan_sweep(spec_path: str, vary: Sequence[str], set_items: Sequence[str] = (), *, out_dir: Optional[str] = None,
               zip_: bool = False, launch_items: Sequence[str] = ()) -> SweepPlan:
    """Expand and validate every variant (no torch); raises SweepError listing every problem at once."""
    from dsv4cli.train.launch import plan_launch

    axes = parse_axes(vary, set_items, zip_)
    out = Path(out_dir) if out_dir else default_out_dir(spec_path, set_items)
    sweep = SweepPlan(spec_path, out, axes, variants(axes, out, zip_))
    sweep.plans = [plan_launch(spec_path, v.overrides([*set_items, *launch_items])) for v in sweep.variants]
    problems = per_variant([p.problems for p in sweep.plans], sweep.variants)
    if problems:
        raise SweepError(problems)
    sweep.warnings = per_variant([p.warnings for p in sweep.plans], sweep.variants)
    return sweep


def preflight(sweep: SweepPlan, force: bool = False) -> tuple[list[str], list[str]]:
    """The checks `dsv4 train` makes before starting, for every variant -> (problems, warnings).

    Device settings, the checkpoint a variant would resume from (it must hold the variant's
    model), and the memory estimate against this machine (a warning with `force`).
    """
    from dsv4cli.train.launch import preflight_checkpoint, preflight_device, preflight_memory

    problems, warnings = [], []
    for _, plan in sweep:
        mine, notes = [], []
        problem = preflight_device(plan.spec) or preflight_checkpoint(plan.spec)
        if problem:
            mine.append(f"error: {problem}")
        fits, message = preflight_memory(plan.spec, plan.world_size)
        if not fits and force:
            notes.append(f"warning: {message}; starting anyway (--force)")
        elif not fits:
            mine.append(f"error: the run does not fit: {message} (--force to try anyway)")
        problems.append(mine)
        warnings.append(notes)
    return per_variant(problems, sweep.variants), per_variant(warnings, sweep.variants)


def steps_done(plan) -> Optional[int]:
    """Iteration of the variant's latest checkpoint (None: nothing saved yet)."""
    from dsv4cli.ckpt.layout import latest_iteration

    return latest_iteration(plan.spec.checkpoint.dir)


def is_finished(plan) -> bool:
    done = steps_done(plan)
    return done is not None and done >= plan.spec.train.steps


def read_record(run_dir: str | Path) -> dict:
    """The variant's sweep.json ({} when absent or unreadable)."""
    try:
        return json.loads((Path(run_dir) / VARIANT_RECORD).read_text())
    except (OSError, ValueError):
        return {}


def write_variant_files(sweep: SweepPlan, variant: Variant, plan, add_wall_s: float = 0.0) -> None:
    """DIR/<slug>/spec.toml (the resolved variant spec) and sweep.json (what set it, wall time so far)."""
    from dsv4cli.spec.load import spec_to_toml
    from dsv4cli.ckpt.atomic import write_text_atomic

    record = {
        "set": variant.values,
        "spec": str(Path(sweep.spec_path).resolve()),
        "overrides": plan.overrides,
        "wall_s": read_record(variant.run_dir).get("wall_s", 0.0) + add_wall_s,
    }
    write_text_atomic(variant.run_dir / VARIANT_SPEC, spec_to_toml(plan.spec), mode=0o644)
    write_text_atomic(variant.run_dir / VARIANT_RECORD, json.dumps(record, indent=2) + "\n", mode=0o644)


def train_variant(plan) -> int:
    """Train one variant as `dsv4 train` does once its checks pass (its run directory locked; in-process
    for one process, else torchrun with its run log)."""
    from dsv4cli.train.launch import run_plan
    from dsv4cli.train.runlock import RunLocked

    try:
        return run_plan(plan, log=lambda line: print(line, file=sys.stderr))
    except RunLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_sweep(sweep: SweepPlan, say: Callable[[str], None], train: Callable = train_variant) -> SweepOutcome:
    """Train the unfinished variants in order; -> outcome. A failed variant (exit 1 or 2) does not stop
    the others; a stopped one (Ctrl-C, SIGTERM, exit_interval) stops the sweep after its checkpoint."""
    outcome = SweepOutcome()
    n = len(sweep.variants)
    v = plan = None
    try:
        for i, (v, plan) in enumerate(sweep, start=1):
            done = steps_done(plan)
            head = f"[{i}/{n}] {v.slug}"
            if is_finished(plan):
                say(f"{head}: finished (step {done}), skipped")
                continue
            say(f"{head}: " + (f"resuming from step {done}" if done else "training") + f" -> {v.run_dir}")
            if not plan.in_process:
                say(shell_join(plan.argv))
            code = _timed(sweep, v, plan, train)
            if code:
                outcome.failed[v.slug] = code
                say(f"{head}: failed (exit {code}); the other variants go on")
            elif not is_finished(plan):
                break
        else:
            return outcome
    except KeyboardInterrupt:  # outside the training loop's own handler (start-up, between variants)
        pass
    outcome.stopped_at = v.slug if v else None
    where = "" if v is None else f" after {v.slug}" if is_finished(plan) else f" at {v.slug} step {steps_done(plan) or 0}"
    say(f"sweep stopped{where}; run the same command again to resume")
    return outcome


def _timed(sweep: SweepPlan, v: Variant, plan, train: Callable) -> int:
    """train(plan), with the variant's spec.toml written first and the wall time added to sweep.json after."""
    write_variant_files(sweep, v, plan)
    start = time.monotonic()
    try:
        return train(plan)
    finally:
        write_variant_files(sweep, v, plan, add_wall_s=time.monotonic() - start)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout (this process and its children) to stderr, so stdout
    carries only the `--json` result."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
