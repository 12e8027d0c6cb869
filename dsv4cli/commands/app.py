"""The Typer application objects shared by all command modules."""

from __future__ import annotations

from typing import Optional

import typer

from dsv4cli import __version__

app = typer.Typer(
    name="dsv4",
    help=(
        "Build, train and maintain DeepSeek-V4-style models on Megatron-Core from one TOML spec.\n\n"
        "Start with: dsv4 validate specs/tiny.toml, then dsv4 train specs/tiny.toml."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

inspect_app = typer.Typer(
    help="Look inside a spec, a built model or a saved checkpoint.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(inspect_app, name="inspect")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dsv4 {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the dsv4 version and exit."
    ),
) -> None:
    """dsv4 command-line interface."""
