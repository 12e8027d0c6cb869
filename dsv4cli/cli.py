"""Entry point of the `dsv4` console script: imports the command modules, runs the app."""

from __future__ import annotations

from dsv4cli.commands.app import app

# Importing a command module registers its commands on `app`.
from dsv4cli.commands import spec_cmds, model_cmds, train_cmds, ckpt_cmds, sweep_cmds, infer_cmds  # noqa: F401,E402


def main() -> None:
    app()


if __name__ == "__main__":
    main()
