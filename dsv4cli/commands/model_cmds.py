"""CLI commands of the model area (thin: parse, call the library, render)."""

from __future__ import annotations

from dsv4cli.commands.app import app, inspect_app  # noqa: F401
