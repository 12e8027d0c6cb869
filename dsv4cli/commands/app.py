"""The Typer application objects shared by all command modules."""

from __future__ import annotations

from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup


class _HelpCommand(TyperCommand):
    """A command whose --help names values the way its examples do: `SPEC`, `--steps N`, `--set KEY=VALUE`
    (no `{SPEC}`, `<list[str]>`, `<int range>`)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = _value_name(param)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx, formatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            if getattr(param, "hidden", False):
                continue
            if param.param_type_name == "argument":
                args.append((_value_name(param), param.help or ""))
            else:
                opts.append(_option_record(param))
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class _HelpGroup(TyperGroup):
    """A command group whose command list shows each command's whole first sentence (wrapped, not cut)."""

    def format_commands(self, ctx, formatter) -> None:
        rows = [(name, cmd.get_short_help_str(limit=1000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _value_name(param) -> str:
    """The metavar (`SPEC`, `N`, `KEY=VALUE`), else the upper-case name; `...` for several values."""
    name = param.metavar or (param.name or "value").upper()
    return name + ("..." if param.nargs != 1 else "")


def _option_record(param) -> tuple[str, str]:
    name = ", ".join(param.opts)
    if not (param.is_flag or param.count):
        name += f" {_value_name(param)}"
    help_text = param.help or ""
    default = param.default
    if default is not None and not param.is_flag and not param.multiple and default != "":
        help_text += f"  [default: {default}]"
    return name, help_text


class _App(typer.Typer):
    """typer.Typer whose commands and groups use the help formatting above."""

    def __init__(self, **kwargs):
        super().__init__(cls=_HelpGroup, **kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", _HelpCommand)
        return super().command(*args, **kwargs)


app = _App(
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

inspect_app = _App(
    help="Look inside a spec, a built model or a saved checkpoint.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(inspect_app, name="inspect")


def _version_callback(value: bool) -> None:
    if value:
        from dsv4cli.compat.versions import version_line

        typer.echo(version_line())
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True,
        help="Print the versions of dsv4, megatron-core and torch (package metadata) and exit.",
    ),
) -> None:
    """dsv4 command-line interface."""
