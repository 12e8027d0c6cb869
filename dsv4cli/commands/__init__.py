"""CLI command modules. Each registers thin Typer commands on `dsv4cli.commands.app`.

Rule: nothing here imports torch or megatron at module level, so `dsv4 --help` and
`dsv4 validate` stay fast; heavy imports happen inside the command functions.
"""
