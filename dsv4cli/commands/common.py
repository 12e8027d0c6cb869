"""What the command modules share: the SPEC argument, the `--set` and `--json` options, the error exit and
human-readable numbers (no torch)."""

from __future__ import annotations

from typing import Any, NoReturn

import typer


def spec_argument(help: str = "Spec file.") -> Any:
    """The positional SPEC argument of every command that reads a spec (a typer.Argument default)."""
    return typer.Argument(..., metavar="SPEC", help=help)


def set_option(example: str = "model.mhc.streams=4", spec: str = "spec", note: str = "") -> Any:
    """The repeatable `--set KEY=VALUE` option of every command that reads a spec (a typer.Option default)."""
    return typer.Option(
        None, "--set", metavar="KEY=VALUE",
        help=f"Override one key of the {spec}, e.g. --set {example}{note} (repeatable; the last one wins).",
    )  # fmt: skip


def json_option(help: str) -> Any:
    """The `--json` flag: print machine-readable output instead of text; `help` says what is printed."""
    return typer.Option(False, "--json", help=help)


def fail(*lines: str, code: int = 2) -> NoReturn:
    """Print each line to stderr and exit with `code` (2: bad input, 1: runtime failure); no traceback."""
    for line in lines:
        typer.echo(line, err=True)
    raise typer.Exit(code)


def human_bytes(nbytes: float) -> str:
    """Binary units: `512 B`, `1.50 KiB`, `8.88 MiB`, ... `TiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def human_count(value: float, unit: str = "") -> str:
    """Decimal prefixes: `950`, `1.20 M`, `3.40 TFLOP` (k, M, G, T, P)."""
    for factor, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}{unit}"
    return f"{value:g} {unit}".rstrip()


def spec_or_exit(path: str, overrides, checked: bool = True):
    """The spec at `path` with `--set` overrides: checked (load_spec) or only resolved (resolve_spec).
    A bad spec prints each problem as `FILE:LINE: key: message` and exits 2."""
    from dsv4cli.spec.load import SpecError, load_spec, resolve_spec

    try:
        return (load_spec if checked else resolve_spec)(path, overrides or ())
    except SpecError as e:
        fail(*(str(problem) for problem in e.problems))
