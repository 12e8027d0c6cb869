"""CLI command modules. Each registers thin Typer commands on `dsv4cli.commands.app`; `common`
holds what they share (the `--set` option, the error exit, number formats, loading a spec or exiting 2).

Rule: nothing here imports torch or megatron at module level, so `dsv4 --help` and
`dsv4 validate` stay fast; heavy imports happen inside the command functions.
"""
