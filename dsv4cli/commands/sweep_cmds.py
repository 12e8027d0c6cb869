"""CLI command `dsv4 sweep` (thin: parse, call dsv4cli.sweep, render)."""

from __future__ import annotations

from typing import List, Optional

import typer

from dsv4cli.commands.app import app
from dsv4cli.commands.common import fail, json_option, set_option, spec_argument


def _say(line: str) -> None:
    typer.echo(line, err=True)


def _print(renderable) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # a pipe or file gets the whole table, not 80 columns of ellipses
        console = Console(highlight=False, width=200)
    console.print(renderable)


@app.command("sweep")
def sweep(
    spec: str = spec_argument("Spec file every variant starts from."),
    vary: Optional[List[str]] = typer.Option(None, "--vary", metavar="KEY=V1,V2,...",
                                             help="Values of one key (TOML values, as --set); repeatable."),
    set_: Optional[List[str]] = set_option("train.steps=20", note=" in every variant"),
    out: Optional[str] = typer.Option(None, "--out", metavar="DIR",
                                      help="Sweep directory; variant runs go to DIR/<slug> (default sweeps/<spec name>)."),
    zip_: bool = typer.Option(False, "--zip", help="Pair the --vary lists (equal lengths) instead of their product."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1, metavar="N",
                                                 help="Overrides launch.nproc_per_node in every variant."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the variants with their estimates; run nothing."),
    slurm: Optional[str] = typer.Option(None, "--slurm", metavar="DIR",
                                        help="Write one sbatch script per variant into DIR; run nothing."),
    summary_only: bool = typer.Option(False, "--summary-only", help="Only print the summary of DIR's runs."),
    as_json: bool = json_option('Print {"variants": [...]} on stdout (progress on stderr).'),
    force: bool = typer.Option(False, "--force", help="Start even if a memory estimate exceeds the device memory."),
) -> None:
    """Train a grid of SPEC variants one by one (as dsv4 train) and compare them.

    The variants are the product of the --vary lists (--zip: pairwise); each trains into
    DIR/<slug> with its resolved spec saved there. Every variant is validated before anything
    runs. Re-running the same command skips finished variants and resumes the others; Ctrl-C
    stops after the current variant's checkpoint. At the end: a table (best row marked) and
    DIR/curves.png.

    Examples:

    \b
      dsv4 sweep specs/tiny.toml --vary model.mhc.streams=1,2,4
      dsv4 sweep specs/tiny.toml --vary model.mhc.streams=1,4 --vary model.mtp.depth=0,1 --json
      dsv4 sweep specs/model.toml --vary model.mhc.streams=2,4 --slurm jobs/
    """
    from dsv4cli.sweep.grid import SweepError
    from dsv4cli.sweep.run import plan_sweep
    from dsv4cli.train.launch import launch_overrides

    try:
        plan = plan_sweep(spec, vary or [], set_ or [], out_dir=out, zip_=zip_,
                          launch_items=launch_overrides(nproc_per_node))
    except SweepError as e:
        fail(*e.problems)
    for line in plan.warnings:
        _say(line)
    if dry_run:
        _dry_run(plan, as_json)
    elif slurm:
        _write_slurm(plan, slurm)
    elif not summary_only:
        _train(plan, force, as_json)
    _summary(plan, as_json)


def _dry_run(plan, as_json: bool) -> None:
    import json

    from dsv4cli.spec.launch_cmd import shell_join
    from dsv4cli.sweep.summary import dry_run_rows, dry_run_table, to_json

    rows = dry_run_rows(plan)
    if as_json:
        typer.echo(to_json(rows))
        raise typer.Exit(0)
    _print(dry_run_table(plan, rows))
    for r in rows:
        typer.echo(f"# {r['slug']}: {json.dumps(r['set'])}\n{shell_join(r['torchrun'])}")
    raise typer.Exit(0)


def _write_slurm(plan, out_dir: str) -> None:
    from pathlib import Path

    from dsv4cli.sweep.run import write_variant_files
    from dsv4cli.ckpt.atomic import write_text_atomic
    from dsv4cli.train.launch import slurm_script

    for variant, launch in plan:
        path = Path(out_dir) / f"{variant.slug}.sbatch"
        write_text_atomic(path, slurm_script(launch), mode=0o755)
        write_variant_files(plan, variant, launch)
        typer.echo(f"wrote {path}: sbatch {path}")
    raise typer.Exit(0)


def _train(plan, force: bool, as_json: bool) -> None:
    from contextlib import nullcontext

    from dsv4cli.sweep.run import preflight, run_sweep, stdout_to_stderr

    problems, warnings = preflight(plan, force)
    if problems:
        fail(*problems)
    for line in warnings:
        _say(line)
    with stdout_to_stderr() if as_json else nullcontext():
        outcome = run_sweep(plan, _say)
    _summary(plan, as_json, code=outcome.exit_code)


def _summary(plan, as_json: bool, code: int = 0) -> None:
    from dsv4cli.sweep.summary import plot_sweep, summary_rows, summary_table, to_json
    from dsv4cli.train.plot import PlotError

    rows = summary_rows(plan)
    try:
        path = plot_sweep(plan, rows)
        if path is not None:
            _say(f"wrote {path}")
    except PlotError as e:
        _say(f"warning: no curves plot: {e}")
    if as_json:
        typer.echo(to_json(rows))
    else:
        _print(summary_table(plan, rows))
    raise typer.Exit(code)
