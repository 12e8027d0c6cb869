"""CLI commands of the ckpt area (thin: parse, call the library, render): convert-ckpt,
inspect checkpoint, inspect diff. torch is imported inside the commands only."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from dsv4cli.commands.app import app, inspect_app
from dsv4cli.commands.common import fail, human_bytes, json_option, set_option

_SPEC_IN_USE = "spec in use (--spec, else the saved one)"

_LISTED = 10  # problems listed by `inspect checkpoint`; --json has every one


def _objects(names: list[str]) -> str:
    """Non-tensor DCP entries, named by kind: Megatron's per-layer `_extra_state` (empty unless
    Transformer Engine FP8 fills it), `rng_state`, ... (several shards of one name count once)."""
    extra = {n.split("/")[0] for n in names if n.split("/")[0].endswith("._extra_state")}
    other = sorted({n.split("/")[0] for n in names} - extra)
    parts = [f"_extra_state of {len(extra)} linear modules (Megatron's per-module state, empty without TE FP8)"
             ] if extra else []
    return ", ".join(parts + other) or "unnamed"


def _console():
    from rich.console import Console

    return Console(width=200, no_color=True, highlight=False, soft_wrap=True)


@app.command("convert-ckpt")
def convert_ckpt(
    src: str = typer.Argument(..., metavar="SRC", help="Legacy checkpoint: run root (latest iteration) or one iter_* dir."),
    dst: str = typer.Argument(..., metavar="DST", help="New checkpoint root to create."),
    spec: Optional[str] = typer.Option(None, "--spec", metavar="SPEC", help="Spec of the model (default: the checkpoint's dsv4_spec.toml)."),
    set_: Optional[List[str]] = set_option(spec=_SPEC_IN_USE),
    streams: Optional[int] = typer.Option(None, "--streams", metavar="N", help="Stream count n (default: saved spec, else stored shapes)."),
    eps: Optional[float] = typer.Option(None, "--eps", metavar="X", help="Contraction eps the model runs with (default: saved spec, else 1e-6)."),
    verify: bool = typer.Option(False, "--verify", help="Check the converted model reproduces the legacy one."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
    drop_optimizer: bool = typer.Option(False, "--drop-optimizer", help="Write a model-only checkpoint (no optimizer state)."),
    link: bool = typer.Option(False, "--link", help="Hard-link SRC's unchanged data files instead of copying "
                              "them (same filesystem; seconds and no extra space, see docs/checkpoints.md)."),
    as_json: bool = json_option("Print the result as JSON."),
) -> None:
    """Convert a legacy averaging-contraction checkpoint to the learned contraction.

    Function-preserving: adds hc_head_fn = 0, hc_head_scale = 1, hc_head_base =
    logit(1/n - eps) to the main block and every MTP depth lacking them, with zero Adam
    moments; every other tensor is copied bit for bit. SRC is never written; DST is built
    beside its final place and renamed at the end. Exit 0 done (or already converted),
    2 bad input, 1 if --verify fails.

    Examples:

    \b
      dsv4 convert-ckpt runs/old runs/old-learned --verify
      dsv4 convert-ckpt megatron_ckpt/iter_0005000 converted --spec specs/model.toml
      dsv4 convert-ckpt runs/old runs/old-learned --drop-optimizer --force
      dsv4 convert-ckpt runs/old runs/old-learned --link
    """
    from dsv4cli.ckpt.convert import convert_checkpoint
    from dsv4cli.ckpt.errors import CheckpointError
    from dsv4cli.ckpt.integrity import check_checkpoint

    try:
        check_checkpoint(src, loading=True, torch_free=True)  # a damaged SRC: exit 2 before DST is touched
        result = convert_checkpoint(src, dst, spec, streams, eps, force, drop_optimizer, verify,
                                    overrides=set_ or (), link=link)
    except CheckpointError as e:
        fail(f"error: {e}")
    except OSError as e:  # e.g. disk full: nothing was left at DST
        fail(f"error: conversion failed, {dst} not written: {e}", code=1)
    failed = result.verify is not None and not result.verify["ok"]
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        raise typer.Exit(1 if failed else 0)
    if result.status == "already_converted":
        typer.echo(f"{result.src}: already converted (has hc_head_* for every block); nothing written")
        raise typer.Exit(0)
    typer.echo(f"converted {result.src} -> {result.dst} (iteration {result.iteration})")
    typer.echo(f"  streams n = {result.streams} ({result.stream_source}), hidden h = {result.hidden}")
    typer.echo(f"  eps = {result.eps:g} ({result.eps_source}), hc_head_base = logit(1/n - eps) = {result.hc_head_base:.9g}")
    typer.echo(f"  added: {', '.join(result.added)}")
    states = f" ({', '.join(result.optimizer_states)})" if result.optimizer_states else ""
    typer.echo(f"  optimizer state: {result.optimizer}{states}")
    how = "hard-linked to SRC" if result.linked else "copied bit for bit"
    typer.echo(f"  {how}: {len(result.copied_files)} files, {human_bytes(result.bytes_copied)}")
    spec_note = 'contraction.mode = "learned"' if result.spec_written else "none (no spec known)"
    typer.echo(f"  saved spec: {spec_note}")
    if result.verify is not None:
        for c in result.verify["checks"]:
            if c["check"] == "contraction":
                typer.echo(f"  verify contraction: max |learned - average| = {c['max_abs_diff']:.3g} "
                           f"(tol {c['tolerance']:.3g}) {'ok' if c['ok'] else 'FAILED'}")
            elif "error" in c:
                typer.echo(f"  verify model: FAILED to run: {c['error']}")
            else:
                typer.echo(f"  verify model: max |logit diff| = {c['max_abs_logit_diff']:.3g}, loss "
                           f"{c['loss_legacy']:.6f} -> {c['loss_converted']:.6f} (|diff| {c['loss_diff']:.3g}) "
                           f"{'ok' if c['ok'] else 'FAILED'}")
        for s in result.verify["skipped"]:
            typer.echo(f"  verify skipped: {s}")
    raise typer.Exit(1 if failed else 0)


@inspect_app.command("checkpoint")
def inspect_checkpoint_cmd(
    path: str = typer.Argument(..., metavar="PATH", help="Checkpoint: run root or iter_* directory."),
    spec: Optional[str] = typer.Option(None, "--spec", metavar="SPEC", help="Compare against this spec (default: the saved one)."),
    set_: Optional[List[str]] = set_option(spec=_SPEC_IN_USE),
    stats: bool = typer.Option(False, "--stats", help="Load tensors one at a time: norm, mean, std, min, max, NaN/Inf."),
    filter_: Optional[str] = typer.Option(None, "--filter", metavar="GLOB", help="Only tensors whose name matches GLOB."),
    as_json: bool = json_option("Print the report as JSON."),
) -> None:
    """What is inside a saved checkpoint, and whether it matches the spec.

    Reads metadata only (no tensor data unless --stats): format, iteration, saved spec,
    provenance, totals, a tensor tree, and missing / unexpected / mis-shaped tensors; a
    legacy (averaging) checkpoint is flagged with the convert-ckpt command that fixes it.
    Exit 0 when read (also if not conformant), 2 when unreadable or damaged (a data file
    missing or shorter than .metadata says).

    Examples:

    \b
      dsv4 inspect checkpoint runs/tiny
      dsv4 inspect checkpoint runs/tiny/iter_0000200 --stats --filter 'decoder.hc_head*'
      dsv4 inspect checkpoint runs/tiny --spec specs/tiny.toml --json
    """
    from dsv4cli.ckpt.errors import CheckpointError
    from dsv4cli.ckpt.integrity import check_checkpoint
    from dsv4cli.ckpt.report import inspect_checkpoint

    try:
        check_checkpoint(path)
        report = inspect_checkpoint(path, spec, stats, filter_, overrides=set_ or ())
    except CheckpointError as e:
        fail(f"error: {e}")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _render_report(report)


def _render_report(r: dict) -> None:
    from rich.table import Table

    from dsv4cli.ckpt.keys import is_optimizer_key
    from dsv4cli.ckpt.summary import KeyProblem, count_line, ordered

    con = _console()
    meta = r["meta"] or {}
    con.print(f"checkpoint {r['iter_dir']}")
    con.print(f"  format {r['format']}, iteration {r['iteration']}, spec: {r['spec_source'] or 'none'}")
    shown = {k: v for k, v in meta.items() if v is not None and not isinstance(v, (dict, list))}
    if shown:
        con.print("  provenance: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    con.print(f"  {r['tensor_count']} tensors, {r['total_params']:,} model parameters, "
              f"{human_bytes(r['total_bytes'])} ({human_bytes(r['model_bytes'])} model, {human_bytes(r['optimizer_bytes'])} optimizer)")
    if r["object_count"]:
        con.print(f"  {r['object_count']} pickled entries (not tensors): {_objects(r.get('objects') or [])}")
    con.print("  by dtype: " + ", ".join(f"{d}: {v['tensors']} tensors, {human_bytes(v['bytes'])}" for d, v in r["by_dtype"].items()))
    table = Table(show_edge=False, box=None, pad_edge=False)
    for col in ("tensor", "x", "shape", "dtype", "bytes", "shards"):
        table.add_column(col, justify="right" if col in ("x", "bytes", "shards") else "left")
    if r["stats"]:
        for col in ("norm", "mean", "std", "min", "max", "nan/inf"):
            table.add_column(col, justify="right")
    stats = {t["name"]: t.get("stats") for t in r["tensors"]}
    for g in r["tree"]:
        table.add_row(f"{g['group']}/", f"{g['tensors']}", "", "", human_bytes(g["bytes"]), "")
        if is_optimizer_key(g["group"]) and not r["filter"]:
            continue  # one line per optimizer state; --filter '*optimizer.*' lists them
        for row in g["rows"]:
            cells = [f"  {row['name']}", f"{row['count']}", str(row["shape"]), row["dtype"], human_bytes(row["bytes"]), str(row["shards"])]
            if r["stats"]:
                st = stats.get(row["name"]) if row["count"] == 1 else None
                if st is None or "error" in st:
                    cells += ["", "", "", "", "", (st or {}).get("error", "") if st else ""]
                else:
                    cells += [f"{st[k]:.4g}" if st[k] is not None else "-" for k in ("norm", "mean", "std", "min", "max")]
                    cells.append(f"{st['nan']}/{st['inf']}")
            table.add_row(*cells)
    con.print(table)
    problems = ordered(KeyProblem(p["kind"], p["name"], p["message"]) for p in r["problems"] if p["kind"] != "legacy")
    counts = f" ({count_line(problems)})" if problems else ""
    if r["conformant"] is None:
        con.print(f"conformance: not checked (no spec saved; pass --spec){counts}")
    else:
        con.print(f"conformance vs {r['spec_source']}: {'conformant' if r['conformant'] else 'NOT conformant'}{counts}")
    for p in problems[:_LISTED]:  # the legacy flag is said below, with the command
        con.print(f"  {p.text}" if p.text.startswith(p.kind) else f"  {p.kind}: {p.text}")
    if len(problems) > _LISTED:
        con.print(f"  ... {len(problems) - _LISTED} more (see all with --json)")
    if r["legacy"]:
        con.print(f"legacy checkpoint (averaging contraction); convert with:\n  {r['fix_command']}")


@inspect_app.command("diff")
def inspect_diff(
    a: str = typer.Argument(..., metavar="A", help="First checkpoint."),
    b: str = typer.Argument(..., metavar="B", help="Second checkpoint."),
    as_json: bool = json_option("Print the diff as JSON."),
) -> None:
    """Compare two checkpoints: keys only in A or B, shape/dtype changes, and per-tensor
    max |A - B| (tensors streamed one at a time). Exit 0 when both were read, 2 otherwise.

    Examples:

    \b
      dsv4 inspect diff runs/old runs/old-learned
      dsv4 inspect diff runs/a/iter_0000100 runs/b/iter_0000100 --json
    """
    from dsv4cli.ckpt.diff import diff_checkpoints
    from dsv4cli.ckpt.errors import CheckpointError
    from dsv4cli.ckpt.integrity import check_checkpoint

    try:
        check_checkpoint(a)
        check_checkpoint(b)
        d = diff_checkpoints(a, b)
    except CheckpointError as e:
        fail(f"error: {e}")
    code = 2 if d.unreadable else 0  # a tensor whose bytes cannot be read: unreadable input
    if as_json:
        typer.echo(json.dumps(d.to_json(), indent=2))
        raise typer.Exit(code)
    con = _console()
    con.print(f"A {d.a}\nB {d.b}")
    for title, rows in (("only in A", d.only_in_a), ("only in B", d.only_in_b)):
        con.print(f"{title}: {len(rows)}")
        for e in rows:
            con.print(f"  {e['name']} {e['shape']} {e['dtype']}")
    con.print(f"shape/dtype changed: {len(d.changed)}")
    for c in d.changed:
        con.print(f"  {c['name']}: {c['a']['shape']} {c['a']['dtype']} -> {c['b']['shape']} {c['b']['dtype']}")
    con.print(f"compared {len(d.compared)} tensors: {d.identical} identical, {d.different} different, "
              f"max |A - B| = {d.max_abs_diff:.6g}")
    for c in d.compared:
        if not c["identical"]:
            con.print(f"  {c['name']}: max |A - B| = {c['max_abs_diff']:.6g}")
    for u in d.unreadable:
        typer.echo(f"error: {u['error']}", err=True)
    raise typer.Exit(code)
