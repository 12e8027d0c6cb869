"""The torchrun command line `dsv4 train` runs for a spec (no torch import; just argv)."""

from __future__ import annotations

import shlex
from typing import Optional, Sequence

from dsv4cli.spec.schema import Spec

TRAIN_ENTRY_MODULE = "dsv4cli.train.entry"


def torchrun_command(
    spec: Spec,
    spec_path: str,
    *,
    nproc_per_node: Optional[int] = None,
    nnodes: Optional[int] = None,
    node_rank: Optional[int] = None,
    rdzv_endpoint: Optional[str] = None,
    overrides: Sequence[str] = (),
    launcher: Sequence[str] = ("torchrun",),
) -> list[str]:
    """argv: torchrun --nnodes N --nproc-per-node P --node-rank R --rdzv-backend c10d
    --rdzv-endpoint HOST:PORT -m dsv4cli.train.entry SPEC [--set K=V]...

    Keyword arguments override the spec's [launch] values (the `dsv4 train` flags);
    `launcher` replaces the leading "torchrun" (e.g. [sys.executable, "-m", "torch.distributed.run"]).
    """
    launch = spec.launch
    argv = [
        *launcher,
        "--nnodes", str(nnodes if nnodes is not None else launch.nnodes),
        "--nproc-per-node", str(nproc_per_node if nproc_per_node is not None else launch.nproc_per_node),
        "--node-rank", str(node_rank if node_rank is not None else launch.node_rank),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", rdzv_endpoint or launch.rdzv_endpoint,
        "-m", TRAIN_ENTRY_MODULE,
        str(spec_path),
    ]
    for item in overrides:
        argv += ["--set", item]
    return argv


def shell_join(argv: Sequence[str]) -> str:
    """argv -> one shell-quoted line for display."""
    return shlex.join(list(argv))
