"""Parallel layout arithmetic: world size, derived dp / expert grid, and Megatron's pp_layout strings."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Optional

from dsv4cli.spec.schema import Spec

LAYOUT_CHARS = {"E": "embedding", "t": "decoder layer", "m": "MTP layer", "L": "loss"}


def default_world_size(spec: Spec) -> int:
    """launch.nproc_per_node * launch.nnodes."""
    return spec.launch.nproc_per_node * spec.launch.nnodes


@dataclass(frozen=True)
class ParallelSizes:
    """Every process-group size of one run (Megatron-Core's dense and expert grids).

    dense grid:  world = tp * cp * dp * pp
    expert grid: world = etp * ep * edp * pp
    """

    world: int
    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    ep: int
    etp: int
    edp: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int

    def to_json(self) -> dict:
        return asdict(self)


def parallel_sizes(spec: Spec, world_size: Optional[int] = None) -> ParallelSizes:
    """Derived sizes (integer division; `dsv4cli.spec.rules` reports when they do not divide)."""
    p, t = spec.parallel, spec.train
    world = world_size or default_world_size(spec)
    dp = max(1, world // (p.tp * p.pp * p.cp))
    edp = max(1, world // (p.etp * p.ep * p.pp))
    micro = max(1, t.global_batch_size // (t.micro_batch_size * dp))
    return ParallelSizes(
        world=world, tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, dp=dp, ep=p.ep, etp=p.etp, edp=edp,
        micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size, num_microbatches=micro,
    )


def parse_pp_layout(layout: str) -> list[str]:
    """Megatron layout string -> one string of layer chars per stage (Megatron's own grammar).

    "Et*3|(tt|)*2,m|L" -> ["Ettt", "tt", "tt", "m", "L"]: `(x)*n` and `c*n` repeat, commas are
    cosmetic, `|` separates stages (pp-major: stage i lives on pp rank i % pp, vpp chunk i // pp).
    Raises ValueError naming the bad character.
    """
    text = layout.replace(",", "")
    text = re.sub(r"\(([^)]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    text = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
    stages = text.split("|")
    for stage in stages:
        for char in stage:
            if char not in LAYOUT_CHARS:
                known = ", ".join(f"{c} ({n})" for c, n in LAYOUT_CHARS.items())
                raise ValueError(f"invalid layout character {char!r}; known: {known}, | stage separator")
    return stages
