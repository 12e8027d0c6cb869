"""The one exception for a checkpoint that cannot be used (bad input: the CLI and the ranks map it to exit 2).

Raised by the checkpoint package (`dsv4cli.ckpt`: tools, save / load, the checks before a load) for the
CLI, training and eval alike. A ValueError, so code that treats bad values generally still catches it.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (or an argument about one) that cannot be used; the message says why, in one line."""
