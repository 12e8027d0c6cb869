"""CLI commands of the model area (thin: parse, call the library, render): inspect model."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from dsv4cli.commands.app import app, inspect_app  # noqa: F401
from dsv4cli.commands.common import fail, json_option, set_option, spec_argument, spec_or_exit


@inspect_app.command("model")
def inspect_model(
    spec: str = spec_argument(),
    set_: Optional[List[str]] = set_option(),
    as_json: bool = json_option("Print JSON (tree, parameters, counts)."),
) -> None:
    """Build the spec's model on CPU (one process) and show its module tree (repeated layers folded)
    and parameter counts, checked against the estimate of `dsv4 validate`.

    Parallel sizes are forced to 1 (the vocabulary keeps the padding of the spec's tp) and tensors
    are shapes only, so specs of any size inspect in seconds.
    Exit 0 when the parameters match the estimate, 1 when they do not, 2 on a bad spec."""
    resolved = spec_or_exit(spec, set_)

    import warnings

    from dsv4cli.build.config import UnsupportedSpecError  # no torch import

    try:
        with warnings.catch_warnings():  # megatron's import-time notices (no TE/Apex, deprecations)
            warnings.simplefilter("ignore")
            from dsv4cli.build.model_summary import inspect_model as build_and_inspect

            report = build_and_inspect(resolved)
    except (UnsupportedSpecError, ValueError) as e:
        fail(f"{spec}: {e}")
    except Exception as e:  # noqa: BLE001 - one-line error, exit 1
        fail(f"{spec}: building the model failed: {type(e).__name__}: {e}", code=1)

    estimate = _estimate(resolved)
    matches = estimate is None or sorted(estimate) == sorted(report.params)
    if as_json:
        data = report.to_json()
        data["spec"] = spec
        data["matches_estimate"] = matches if estimate is not None else None
        typer.echo(json.dumps(data))
    else:
        _render(report, matches, estimate is not None)
    raise typer.Exit(0 if matches else 1)


def _estimate(spec):
    """The spec-only parameter inventory of `validate`, or None if that module is unavailable."""
    try:
        from dsv4cli.spec.estimate import param_inventory
    except ImportError:
        return None
    return [(name, tuple(shape)) for name, shape in param_inventory(spec)]


def _render(report, matches: bool, checked: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from dsv4cli.model.inventory import render_tree

    console = Console(highlight=False)
    for line in render_tree(report.tree):
        console.print(line, markup=False)
    table = Table(title="Parameters by module", title_justify="left",
                  caption="as in the tree above: a module counts every parameter below it", caption_justify="left")
    table.add_column("module")
    table.add_column("count", justify="right")
    for top, count, parts in report.by_module():
        table.add_row(top, f"{count:,}")
        for part, label in (("mhc", "mHC (hyper-connections)"), ("contraction", "contraction (hc_head_*)")):
            if parts[part]:
                table.add_row(f"  of which {label}", f"{parts[part]:,}")
    table.add_row("total", f"{report.total:,}")
    console.print(table)
    if checked:
        console.print("matches the validate estimate: " + ("yes" if matches else "NO"), markup=False)
