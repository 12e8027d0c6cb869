"""CLI commands of the train area (thin: parse, call the library, render): train, eval, prepare-data, plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from dsv4cli.commands.app import app, inspect_app  # noqa: F401
from dsv4cli.commands.common import fail, json_option, set_option, spec_argument

_VERBOSE_HELP = "Also show known library warnings and torchrun's own output (hidden by default)."


def _plan(spec: str, set_, nproc_per_node, nnodes, node_rank, rdzv_endpoint, extra_args=(), verbose=False):
    from dsv4cli.train.launch import launch_overrides, plan_launch

    overrides = list(set_ or []) + launch_overrides(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    plan = plan_launch(spec, overrides, extra_args=extra_args, verbose=verbose)
    for w in plan.warnings:
        typer.echo(w, err=True)
    if plan.problems:
        fail(*plan.problems)
    return plan


@app.command("train")
def train(
    spec: str = spec_argument(),
    set_: Optional[List[str]] = set_option("train.steps=300"),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1, metavar="N", help="Overrides launch.nproc_per_node."),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", min=1, metavar="N", help="Overrides launch.nnodes."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", min=0, metavar="R", help="Overrides launch.node_rank."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", metavar="HOST:PORT",
                                                help="Overrides launch.rdzv_endpoint."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved spec and the torchrun command; run nothing."),
    slurm: Optional[str] = typer.Option(None, "--slurm", metavar="FILE", help="Write an sbatch script running the same torchrun command on every node."),
    force: bool = typer.Option(False, "--force", help="Start even if the memory estimate exceeds the device memory."),
    verbose: bool = typer.Option(False, "--verbose", help=_VERBOSE_HELP),
) -> None:
    """Train a model from SPEC: validate, check memory, then run (in-process for 1 process, else torchrun).

    Resumes from checkpoint.dir when it holds a checkpoint of the same [model] (raise train.steps
    to train further). Progress goes to the terminal and to checkpoint.dir/metrics.jsonl; the run
    ends with a summary and the commands to look at it (dsv4 eval, dsv4 plot).

    Examples:

    \b
      dsv4 train specs/tiny.toml
      dsv4 train specs/tiny.toml --set train.steps=300
      dsv4 train specs/tiny.toml --set model.mhc.streams=8 --set checkpoint.dir=runs/tiny-8
      dsv4 train specs/model.toml --dry-run
      dsv4 train specs/dsv4-flash.toml --slurm flash.sbatch
    """
    from dsv4cli.spec.launch_cmd import shell_join
    from dsv4cli.spec.load import spec_to_toml

    plan = _plan(spec, set_, nproc_per_node, nnodes, node_rank, rdzv_endpoint, verbose=verbose)
    if dry_run:
        typer.echo(spec_to_toml(plan.spec).rstrip())
        typer.echo("")
        typer.echo("# torchrun command:")
        typer.echo(shell_join(plan.argv))
        raise typer.Exit(0)
    if slurm:
        from dsv4cli.ckpt.atomic import write_text_atomic
        from dsv4cli.train.launch import slurm_script

        write_text_atomic(slurm, slurm_script(plan), mode=0o755)
        typer.echo(f"wrote {slurm}: sbatch {slurm}")
        raise typer.Exit(0)
    from dsv4cli.train.launch import preflight_checkpoint, preflight_device, preflight_memory, run_plan
    from dsv4cli.train.runlock import RunLocked, check_free

    try:
        if plan.spec.launch.node_rank == 0:  # node 0 holds a run's lock (run_plan)
            check_free(plan.spec.checkpoint.dir)  # a second run into a busy directory: refused at once
    except RunLocked as e:
        fail(f"error: {e}")
    problem = preflight_device(plan.spec) or preflight_checkpoint(plan.spec)
    if problem:
        fail(f"error: {problem}")
    fits, message = preflight_memory(plan.spec, plan.world_size)
    if not fits and not force:
        fail(f"error: the run does not fit: {message} (--force to try anyway)")
    if not fits:
        typer.echo(f"warning: {message}; starting anyway (--force)", err=True)
    try:
        code = run_plan(plan, verbose=verbose, log=lambda line: typer.echo(line, err=True))
    except RunLocked as e:
        fail(f"error: {e}")
    raise typer.Exit(code)


@app.command("eval")
def eval_(
    spec: str = spec_argument(),
    load: str = typer.Option(..., "--load", metavar="DIR", help="Checkpoint root (-> latest) or one iter_* directory."),
    set_: Optional[List[str]] = set_option("model.mhc.streams=8", note=" to match the checkpoint's model"),
    batches: Optional[int] = typer.Option(None, "--batches", min=1, metavar="N", help="Held-out global batches (default train.eval_batches)."),
    as_json: bool = json_option('Print {"loss", "mtp_losses", "tokens"}.'),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1, metavar="N", help="Overrides launch.nproc_per_node."),
    verbose: bool = typer.Option(False, "--verbose", help=_VERBOSE_HELP),
) -> None:
    """Held-out loss of a checkpoint under SPEC's model (weights only; any parallel layout).

    SPEC's [model] must be the checkpoint's (same --set model.* overrides as in training).

    Examples:

    \b
      dsv4 eval specs/tiny.toml --load runs/tiny
      dsv4 eval specs/tiny.toml --load runs/tiny/iter_0000100 --batches 16 --json
      dsv4 eval specs/tiny.toml --load runs/tiny-8 --set model.mhc.streams=8
    """
    extra = ["--eval", "--load", load] + (["--batches", str(batches)] if batches else []) + (["--json"] if as_json else [])
    plan = _plan(spec, set_, nproc_per_node, None, None, None, extra_args=extra, verbose=verbose)
    if plan.in_process:
        from dsv4cli.train.entry import run

        raise typer.Exit(run(spec, plan.overrides, mode="eval", load=load, batches=batches, as_json=as_json,
                             verbose=verbose))
    from dsv4cli.build.gpu_settings import export_launch_env
    from dsv4cli.train.launch import run_torchrun

    export_launch_env(plan.spec)  # e.g. CUDA_DEVICE_MAX_CONNECTIONS=1 for the ranks (CUDA, tp or cp > 1)
    raise typer.Exit(run_torchrun(plan.argv, verbose=verbose))


@app.command("prepare-data")
def prepare_data(
    input_jsonl: str = typer.Argument(..., metavar="INPUT.jsonl", help="JSON lines, one document per line."),
    out_prefix: str = typer.Argument(..., metavar="OUT_PREFIX", help="Writes OUT_PREFIX.bin and OUT_PREFIX.idx."),
    tokenizer: str = typer.Option("byte", "--tokenizer", metavar="byte|PATH", help="'byte' or a tokenizer.json."),
    key: str = typer.Option("text", "--key", metavar="FIELD", help="JSON field holding the text."),
    as_json: bool = json_option("Print the summary as JSON."),
    verbose: bool = typer.Option(False, "--verbose", help="Also show known library warnings (hidden by default)."),
) -> None:
    """Build a Megatron indexed dataset (.bin/.idx) from JSON lines (for data.source = 'indexed').

    Examples:

    \b
      dsv4 prepare-data corpus.jsonl data/corpus
      dsv4 prepare-data corpus.jsonl data/corpus --tokenizer tokenizer.json --key content
      dsv4 train specs/model.toml --set data.source=indexed --set 'data.paths=["data/corpus"]'
    """
    from dsv4cli.noise import quiet_known_noise
    from dsv4cli.train.data import DataError
    from dsv4cli.train.data import prepare_data as build

    quiet_known_noise(verbose)
    try:
        info = build(input_jsonl, out_prefix, tokenizer=tokenizer, key=key)
    except DataError as e:
        fail(f"error: {e}")
    if as_json:
        typer.echo(json.dumps(info))
    else:
        typer.echo(f"wrote {info['prefix']}.bin/.idx: {info['documents']:,} documents, {info['tokens']:,} tokens "
                   f"({info['dtype']}, vocab {info['vocab_size']}, eod {info['eod']})")


@app.command("plot")
def plot(
    run_dirs: List[str] = typer.Argument(..., metavar="RUN_DIR", help="Run directories (checkpoint.dir) with metrics.jsonl."),
    output: Optional[str] = typer.Option(
        None, "-o", "--output", metavar="FILE",
        help="Image file to write (.png, .pdf, .svg; default: curves.png in the first RUN_DIR)."),
) -> None:
    """Draw the loss curves (training, MTP, held-out) of one or more runs side by side.

    Examples:

    \b
      dsv4 plot runs/tiny                       # -> runs/tiny/curves.png
      dsv4 plot runs/tiny runs/tiny-8 -o compare.png
    """
    from dsv4cli.train.plot import PlotError, plot_runs

    try:
        out = plot_runs(run_dirs, output or str(Path(run_dirs[0]) / "curves.png"))
    except PlotError as e:
        fail(f"error: {e}")
    typer.echo(f"wrote {out}")
