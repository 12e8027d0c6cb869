"""CLI commands of the spec area (thin: parse, call the library, render): validate, inspect spec, schema."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from dsv4cli.commands.app import app, inspect_app
from dsv4cli.commands.common import human_bytes, human_count, json_option, set_option, spec_argument, spec_or_exit


@app.command("validate")
def validate(
    specs: List[str] = spec_argument("Spec file(s) to check."),
    set_: Optional[List[str]] = set_option("model.mhc.streams=8"),
    world_size: Optional[int] = typer.Option(
        None, "--world-size", min=1, metavar="N", help="Processes in total (default: launch.nproc_per_node * launch.nnodes)."
    ),
    resolved: bool = typer.Option(False, "--resolved", help="Also list the resolved spec: every key, its value "
                                  "and the FILE:LINE that set it (or default)."),
    as_json: bool = json_option("One JSON object per spec per line."),
) -> None:
    """Check specs and print estimates; exit 2 on errors.

    Reports every problem at once, one per line on stderr as FILE:LINE: key: message
    (--set for overrides). A valid spec gets a summary: parameters, FLOPs per token,
    memory per rank, parallel sizes and the torchrun command (--resolved: the resolved
    spec first).

    Examples:

    \b
      dsv4 validate specs/tiny.toml
      dsv4 validate specs/model.toml --set model.mhc.streams=8 --world-size 16
      dsv4 validate specs/dsv4-flash.toml --resolved
      dsv4 validate specs/*.toml --json
    """
    from dsv4cli.spec.check import check_spec, summary

    failed = False
    for path in specs:
        report = check_spec(path, set_ or (), world_size)
        failed |= not report.valid
        info = summary(report) if report.valid else None
        if as_json:
            typer.echo(json.dumps({
                "spec": report.path,
                "valid": report.valid,
                "errors": [p.to_json() for p in report.errors],
                "warnings": [p.to_json() for p in report.warnings],
                "summary": info,
            }))
            continue
        for problem in report.errors + report.warnings:
            typer.echo(str(problem), err=True)
        if info is not None:
            _render_summary(report, info, resolved)
    raise typer.Exit(2 if failed else 0)


@inspect_app.command("spec")
def inspect_spec(
    spec: str = spec_argument(),
    set_: Optional[List[str]] = set_option("model.mtp.depth=2"),
    as_json: bool = json_option("Print JSON instead of TOML."),
) -> None:
    """Show the resolved spec (after extends and --set) as TOML, or as JSON.

    Examples:

    \b
      dsv4 inspect spec specs/dsv4-pro.toml
      dsv4 inspect spec specs/tiny.toml --set model.mtp.depth=2 --json
    """
    from dsv4cli.spec.load import spec_to_toml

    resolved = spec_or_exit(spec, set_, checked=False)
    if as_json:
        typer.echo(json.dumps(resolved.model_dump(mode="json", exclude={"extends"}), indent=2))
    else:
        typer.echo(spec_to_toml(resolved), nl=False)


@app.command("schema")
def schema(
    markdown: bool = typer.Option(False, "--markdown", help="The spec reference page (docs/spec.md) instead."),
) -> None:
    """Print the JSON schema of the spec format (every section, key, type, default).

    Examples:

    \b
      dsv4 schema > dsv4-spec.schema.json
      dsv4 schema --markdown     # the reference page docs/spec.md
    """
    if markdown:
        from dsv4cli.spec.docs import schema_markdown

        typer.echo(schema_markdown(), nl=False)
        return
    from dsv4cli.spec.schema import Spec

    typer.echo(json.dumps(Spec.model_json_schema(), indent=2))


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def resolved_lines(spec, data: dict) -> list[str]:
    """`key = value  # FILE:LINE` (or `# default`, `# --set`) per set key, aligned; plain lines so a
    pipe or a narrow terminal wraps them instead of cutting a path or a value."""
    from dsv4cli.spec.load import locate
    from dsv4cli.spec.schema import dotted

    rows = []
    for key, value in dotted(data).items():
        if value is None:
            continue
        file, line = locate(spec, key) if key in spec._origins else ("default", None)
        rows.append((f"{key} = {json.dumps(value)}", f"{file}:{line}" if line else file))
    width = min(max((len(a) for a, _ in rows), default=0), 44)
    return [f"  {a:<{width}}  # {b}" for a, b in rows]


def _render_summary(report, info: dict, resolved: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    from dsv4cli.spec.launch_cmd import shell_join

    console = Console(highlight=False)
    spec = report.spec
    if resolved:
        typer.echo("Resolved spec (key = value  # where it was set):")
        for line in resolved_lines(spec, info["spec"]):
            typer.echo(line)
    n = len(report.warnings)
    console.print(f"{report.path}: valid, {n} warning{'' if n == 1 else 's'}", markup=False)

    params = info["params"]
    table = Table(title="Parameters", title_justify="left")
    table.add_column("part")
    table.add_column("count", justify="right")
    table.add_column("", justify="right")
    apart = info["spec"]["model"].get("attention") is not None  # DeepSeek-V4: MTP counted apart, as HF counts
    rows = [("total without MTP" if apart else "total", params["total"]), ("active per token", params["active"]),
            ("  embedding + output layer", params["embedding"]), ("  routed experts", params["routed_experts"]),
            ("  mHC (hyper-connections)", params["mhc"]), ("  contraction (hc_head_*)", params["contraction"]),
            ("MTP (all depths)" if apart else "  MTP (all depths)", params["mtp"])]
    for name, count in rows:
        table.add_row(name, f"{count:,}", human_count(count))
    table.add_row("FLOPs per token (train)", f"{info['flops_per_token']:,}", human_count(info["flops_per_token"], "FLOP"))
    console.print(table)

    memory = info["memory_per_rank"]
    table = Table(title=f"Memory per rank (busiest: pipeline rank {memory['pipeline_rank']})", title_justify="left")
    table.add_column("part")
    table.add_column("size", justify="right")
    optimizer = "optimizer (distributed)" if memory["distributed_optimizer"] else "optimizer"
    for name, key in (("weights", "weights"), ("grads", "grads"), (optimizer, "optimizer"),
                      ("activations", "activations"), ("  of which n-stream residual", "residual_streams"),
                      ("total", "total")):
        table.add_row(name, human_bytes(memory[key]))
    console.print(table)

    sizes = info["parallel"]
    table = Table(title="Parallel sizes", title_justify="left")
    for name in ("world", "tp", "pp", "vpp", "cp", "dp", "ep", "etp", "edp", "num_microbatches"):
        table.add_column(name, justify="right")
    table.add_row(*(str(sizes[name]) for name in ("world", "tp", "pp", "vpp", "cp", "dp", "ep", "etp", "edp",
                                                  "num_microbatches")))
    console.print(table)
    console.print("torchrun command (dsv4 train):")
    console.print(shell_join(info["torchrun"]), soft_wrap=True, markup=False)
    if not resolved:
        console.print(f"(every key and where it was set: dsv4 validate {report.path} --resolved)", markup=False)
