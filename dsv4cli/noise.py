"""Known library chatter a dsv4 user cannot act on, in one list, and the switch that hides it.

Only warnings that match a (category, message pattern) below are hidden; dsv4's own lines,
other warnings and real errors still show. `--verbose` (on `dsv4 train`, `dsv4 eval`,
`dsv4 prepare-data`) keeps everything: in-process it skips `quiet_known_noise`; under torchrun
the launcher passes `DSV4_VERBOSE=1` to the ranks and shows torchrun's own output too.
No torch import here.
"""

from __future__ import annotations

import os
import warnings

VERBOSE_ENV = "DSV4_VERBOSE"

#: (category, regex matched at the start of the warning message)
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # megatron-core's import-time notices about optional CUDA libraries
    (UserWarning, r"\s*(Transformer Engine and )?Apex (is|are) not installed"),
    (UserWarning, r"full scope is deprecated"),
    # megatron-core 0.19's import-time notices (absl missing, an experimental model family)
    (UserWarning, r"absl\.logging is not installed"),
    (UserWarning, r"MimoModelConfig is experimental"),
    # megatron-core's CUDA stream hint, also printed on CPU where it means nothing
    (UserWarning, r"When using .* it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS"),
    # torch.distributed.checkpoint / collectives deprecations triggered inside megatron-core
    (FutureWarning, r"`load_state_dict` is deprecated"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\._all_gather_base` is a private function"),
    (FutureWarning, r"`torch\.distributed\._reduce_scatter_base` is a private function"),
)


_verbose_here = False  # set by quiet_known_noise: `--verbose` of the command running in this process


def _env_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def verbose_requested() -> bool:
    """Is `--verbose` in effect: asked for in this process, or by the launcher (DSV4_VERBOSE=1)?
    (For code that shortens its output, e.g. long key lists, unless verbose.)"""
    return _verbose_here or _env_verbose()


def quiet_known_noise(verbose: bool | None = None) -> None:
    """Hide the KNOWN_WARNINGS in this process (nothing when `verbose`; None: from the environment)
    and record the choice for verbose_requested()."""
    global _verbose_here
    if verbose is None:
        verbose = _env_verbose()
    _verbose_here = bool(verbose)
    if verbose:
        return
    for category, pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
