"""CLI commands of the inference/interop area (thin: parse, call the library, render): generate, import-hf,
export-hf."""

from __future__ import annotations

import contextlib
import json
from typing import List, Optional

import typer

from dsv4cli.commands.app import app
from dsv4cli.commands.common import fail, json_option, set_option, spec_argument, spec_or_exit


KEPT_FP32_HELP = ("Sinks, mHC and hc_head parameters, compressor position biases, router bias and the attention's "
                  "q / kv / compressor norms")
"""The tensors dsv4 keeps fp32 (import_hf.kept_fp32), as --dtype's help names them."""


def _parse_tokens(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        fail(f"error: --tokens must be comma-separated integers, got {text!r}")


def _dtype_name(dtype: Optional[str], also: tuple[str, ...] = ()) -> Optional[str]:
    """--dtype of import-hf / export-hf (fp32|bf16|fp16, or torch's float32|bfloat16|float16) -> torch's
    name; `also`: further spellings the command takes as they are (export-hf: fp8)."""
    from dsv4cli.infer.import_hf import DTYPE_NAMES

    if dtype in also:
        return dtype
    if dtype is None or dtype in DTYPE_NAMES:
        return DTYPE_NAMES.get(dtype)
    fail(f"error: --dtype must be one of {', '.join((*DTYPE_NAMES, *also))}, got {dtype!r}")


def verify_option(source: str):
    """The `--verify` flag of import-hf / export-hf; `source`: what the written tensors are compared with."""
    return typer.Option(False, "--verify", help=f"Afterwards compare every written tensor with {source}, and "
                        "(with transformers installed) HF's model with dsv4's layer by layer; exit 1 when over "
                        "tolerance. With --json: the object gets a \"verify\" report.")


def _verify(check) -> dict:
    """Run a verify_* call -> its report; when it cannot run (any error), {"ok": False, "error": one line}
    (exit 1 by _verdict; what was written stays)."""
    try:
        return check()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - whatever stops the check is reported, never a traceback
        from dsv4cli.ckpt.tensors import last_line

        reason = last_line(e)
        known = isinstance(e, ValueError)  # CheckpointError, ImportHFError, SafetensorsError, ...
        return {"ok": False, "error": f"verify could not run: {reason if known else f'{type(e).__name__}: {reason}'}"}


def _verdict(report: Optional[dict], as_json: bool) -> None:
    """Print --verify's tables (text mode) and exit 1 when it failed or could not run."""
    if report is None:
        return
    if "error" in report:
        if not as_json:
            typer.echo(f"error: {report['error']}", err=True)
        raise typer.Exit(1)
    if not as_json:
        from dsv4cli.infer.verify import render

        for line in render(report):
            typer.echo(line)
    if not report["ok"]:
        raise typer.Exit(1)


def _report(result: dict, as_json: bool, head: str, where: str = "", noun: str = "tensors",
            verify: Optional[dict] = None) -> bool:
    """--json: print the result object, with `verify` as its "verify" key (False); else '<head>: N <noun>,
    SIZE<where> (saved: dtype: count, ...)' and True, for the command's further text lines."""
    if as_json:
        typer.echo(json.dumps({**result, "verify": verify} if verify is not None else result))
        return False
    from dsv4cli.commands.common import human_bytes

    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(result["dtypes"].items()))
    typer.echo(f"{head}: {result['tensors']} {noun}, {human_bytes(result['bytes'])}{where} (saved: {kinds})")
    return True


@app.command("generate")
def generate(
    spec: str = spec_argument("Spec of the checkpoint's model."),
    load: str = typer.Option(..., "--load", metavar="DIR", help="Checkpoint root (-> latest) or one iter_* directory."),
    prompt: Optional[str] = typer.Option(None, "--prompt", metavar="TEXT", help="Prompt text (data.tokenizer encodes it; no BOS added)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", metavar="ID,ID,...", help="Prompt token ids, used exactly as given."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, metavar="N", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, metavar="T", help="0 = greedy; > 0 samples from softmax(logits / T)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, metavar="P", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", metavar="S", help="Seed of the sampler."),
    set_: Optional[List[str]] = set_option("model.mhc.streams=8", note=" to match the checkpoint's model"),
    as_json: bool = json_option('Print {"tokens": [generated ids], "text": ..., "prompt_logprobs": [...]}.'),
    verbose: bool = typer.Option(False, "--verbose", help="Also show known library warnings (hidden by default)."),
) -> None:
    """Continue a prompt with a checkpoint's model (one process, CPU or one GPU), greedy by default.

    A full forward pass per new token; decoding stops after an id of data.eos_token_ids.

    Examples:

    \b
      dsv4 generate specs/tiny.toml --load runs/tiny --prompt "def main("
      dsv4 generate runs/imported/spec.toml --load runs/imported --tokens 0,17,42 --json
      dsv4 generate specs/tiny.toml --load runs/tiny --prompt "import " --temperature 0.8 --top-p 0.9
    """
    from dsv4cli.build import UnsupportedSpecError
    from dsv4cli.ckpt.errors import CheckpointError
    from dsv4cli.infer.generate import Sampling, generate as run, tokenizer_of
    from dsv4cli.noise import quiet_known_noise

    if (prompt is None) == (tokens is None):
        fail("error: give exactly one of --prompt TEXT and --tokens ID,ID,...")
    quiet_known_noise(verbose)
    s = spec_or_exit(spec, set_)
    tokenizer = tokenizer_of(s)
    if prompt is not None:
        if tokenizer is None:
            fail(f"error: data.tokenizer ({s.data.tokenizer!r}) cannot encode text for this model; use --tokens")
        ids = tokenizer.encode(prompt)
    else:
        ids = _parse_tokens(tokens)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    try:
        out = run(s, load, ids, sampling, tokenizer)
    except (CheckpointError, UnsupportedSpecError, ValueError) as e:
        fail(f"error: {e}")
    if as_json:
        typer.echo(json.dumps(out))
    elif out["text"] is not None:
        typer.echo(out["text"])
    else:
        typer.echo(",".join(str(t) for t in out["tokens"]))


@app.command("import-hf")
def import_hf(
    hf_dir: str = typer.Argument(..., metavar="HF_DIR", help="DeepSeek-V4 directory: save_pretrained's or the public release's layout (detected)."),
    out: str = typer.Argument(..., metavar="OUT", help="New checkpoint directory (must not exist, or be empty)."),
    spec_out: Optional[str] = typer.Option(None, "--spec-out", metavar="FILE", help="Where to write the spec (default OUT/spec.toml)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="fp32|bf16|fp16",
                                        help="Cast floating tensors (default: keep each stored dtype; dequantized FP8/FP4 "
                                             f"weights: bfloat16). {KEPT_FP32_HELP} stay fp32 whatever --dtype says; "
                                             "integer tables keep their dtype."),
    as_json: bool = json_option('Print {"out", "spec", "checkpoint", "tensors", "bytes", "forecast", "dtypes", "mtp_depth", "layout", '
                                  '"dequantized", "notes"}.'),
    layers: Optional[int] = typer.Option(None, "--layers", metavar="K", help="Toy variant: the first K layers (and MTP)."),
    experts: Optional[int] = typer.Option(None, "--experts", metavar="E", help="Toy variant: the first E experts of every MoE layer."),
    verify: bool = verify_option("HF_DIR's tensors (dequantized as imported)"),
    verbose: bool = typer.Option(False, "--verbose", help="Also show known library warnings (hidden by default)."),
) -> None:
    """Import a HF DeepSeek-V4 directory (config.json + safetensors) as a dsv4 checkpoint and spec.

    Builds dsv4's own model from the config in one process and copies every tensor into it by name
    (docs/interop.md); an unknown tensor name is an error. HF_DIR is never written to.

    Examples:

    \b
      dsv4 import-hf hf/DeepSeek-V4-tiny runs/imported
      dsv4 generate runs/imported/spec.toml --load runs/imported --tokens 0,17,42 --json
    """
    from dsv4cli.commands.common import human_bytes
    from dsv4cli.infer.import_hf import ImportHFError, ImportHFFailure, import_hf as run
    from dsv4cli.infer.verify import verify_import
    from dsv4cli.noise import quiet_known_noise

    dtype = _dtype_name(dtype)
    quiet_known_noise(verbose)

    def announce(forecast: int, free: int) -> None:
        if not as_json:
            typer.echo(f"forecast: OUT takes about {human_bytes(forecast)} ({human_bytes(free)} free there)")

    try:
        with _byte_progress("importing", quiet=as_json) as advance:
            result = run(hf_dir, out, spec_out, dtype, layers, experts, advance, announce)
    except ImportHFError as e:
        fail(f"error: {e}")
    except ImportHFFailure as e:
        fail(f"error: {e}", code=1)
    report = _verify(lambda: verify_import(hf_dir, result["checkpoint"], result["spec"], layers, experts)) if verify else None
    if _report(result, as_json, f"imported {hf_dir} -> {result['checkpoint']}", noun="source tensors", verify=report):
        typer.echo(f"layout: {result['layout']}, MTP depth {result['mtp_depth']}, dequantized {result['dequantized']} weights")
        typer.echo(f"spec: {result['spec']}")
        for note in result["notes"]:
            typer.echo(f"note: {note}")
        typer.echo(f"try: dsv4 generate {result['spec']} --load {result['out']} --tokens 0,1,2")
    _verdict(report, as_json)


def _shard_bytes(text: str) -> int:
    """'5GB' / '500MB' / '40KB' / '123' (bytes) -> bytes (decimal units, as transformers reads them)."""
    units = {"TB": 1000**4, "GB": 1000**3, "MB": 1000**2, "KB": 1000, "B": 1}
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            t, scale = t[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        value = int(float(t) * scale)
    except ValueError:
        fail(f"error: --max-shard-size must be a size such as 5GB, 500MB or 40KB, got {text!r}")
    if value <= 0:
        fail(f"error: --max-shard-size must be positive, got {text!r}")
    return value


@contextlib.contextmanager
def _byte_progress(label: str, quiet: bool = False):
    """A rich progress bar (bytes, tensors) on stderr; yields advance(bytes, tensors, total_bytes, total_tensors)
    (None when `quiet`)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    if quiet:
        yield None
        return
    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TextColumn("{task.fields[tensors]} tensors"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None, tensors="0")

        def advance(done: int, count: int, total: int, total_count: int) -> None:
            bar.update(task, completed=done, total=total, tensors=f"{count}/{total_count}")

        yield advance


@app.command("export-hf")
def export_hf(
    ckpt: str = typer.Argument(..., metavar="CKPT", help="Checkpoint root (-> latest) or one iter_* directory."),
    out: str = typer.Argument(..., metavar="OUT", help="New HF model directory (must not exist, or be empty)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="bf16|fp32|fp16|fp8",
                                        help=f"Cast floating tensors (default: keep each stored dtype). {KEPT_FP32_HELP} "
                                             "stay fp32 and integer tables keep their dtype under any --dtype. fp8: "
                                             "linear weights as FP8 e4m3 with 128x128 block scales, the other "
                                             "floating tensors bf16."),
    layout: str = typer.Option("hf", "--layout", metavar="hf|original", help="Tensor names and config keys: hf "
                               "(what transformers' save_pretrained writes) or original (the public release's)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", metavar="SIZE", help="Largest safetensors file."),
    as_json: bool = json_option('Print {"out", "checkpoint", "layout", "tensors", "bytes", "shards", "dtypes", '
                                     '"quantized", "config_source"}.'),
    verify: bool = verify_option("the checkpoint tensor it came from"),
    verbose: bool = typer.Option(False, "--verbose", help="Also show known library warnings (hidden by default)."),
) -> None:
    """Export a dsv4 checkpoint as a directory DeepseekV4ForCausalLM.from_pretrained loads.

    Sharded safetensors (+ index), config.json from the checkpoint's spec (and the config kept by
    import-hf), generation_config.json; names from the import table, run backwards (docs/interop.md).
    CKPT is never written to.

    Examples:

    \b
      dsv4 export-hf runs/imported runs/imported-hf
      dsv4 export-hf runs/finetuned/iter_0000003 hf/finetuned --dtype bf16 --max-shard-size 2GB
    """
    from dsv4cli.build import UnsupportedSpecError
    from dsv4cli.ckpt.errors import CheckpointError
    from dsv4cli.infer.export_hf import ExportHFError, export_hf as run
    from dsv4cli.noise import quiet_known_noise

    if layout not in ("hf", "original"):
        fail(f"error: --layout must be hf or original, got {layout!r}")
    dtype = _dtype_name(dtype, also=("fp8",))
    shard = _shard_bytes(max_shard_size)
    quiet_known_noise(verbose)
    try:
        if as_json:
            result = run(ckpt, out, dtype, shard, layout=layout)
        else:
            with _byte_progress("exporting") as advance:
                result = run(ckpt, out, dtype, shard, advance, layout=layout)
    except (ExportHFError, CheckpointError, UnsupportedSpecError) as e:
        fail(f"error: {e}")
    from dsv4cli.infer.verify import verify_export

    report = _verify(lambda: verify_export(result["checkpoint"], result["out"], layout)) if verify else None
    if _report(result, as_json, f"exported {result['checkpoint']} -> {result['out']}",
               f" in {result['shards']} file(s)", verify=report) and result["config_source"] is None:
        typer.echo("note: no hf_config.json with the checkpoint: keys the spec does not hold have transformers' defaults")
    _verdict(report, as_json)
