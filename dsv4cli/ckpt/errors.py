"""The one exception the checkpoint tools raise for bad input (the CLI maps it to exit 2)."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint (or an argument about one) that cannot be used; the message says why."""
