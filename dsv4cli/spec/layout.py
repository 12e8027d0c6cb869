"""Parallel arithmetic (torch-free): world size, the run's ParallelDims, the single-process copy of a
spec, and Megatron's pp_layout strings."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Optional

from dsv4cli.spec.schema import Spec

LAYOUT_CHARS = {"E": "embedding", "t": "decoder layer", "m": "MTP layer", "L": "loss"}


def default_world_size(spec: Spec) -> int:
    """launch.nproc_per_node * launch.nnodes."""
    return spec.launch.nproc_per_node * spec.launch.nnodes


@dataclass(frozen=True)
class ParallelDims:
    """Every process-group size of one run (Megatron-Core's dense and expert grids), the one type
    that the spec estimates, the builder and the training runtime share.

    dense grid:  world = tp * cp * dp * pp
    expert grid: world = etp * ep * edp * pp
    `of(spec, world)` derives dp / edp / micro-batches by integer division (an estimate for any
    world); the invariants live here: `grid_problems()` / `batch_problems()` say what does not
    divide, `check()` raises ValueError with the sizes (before megatron builds its groups).
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

    @classmethod
    def of(cls, spec: Spec, world_size: Optional[int] = None) -> "ParallelDims":
        """The sizes of `spec` on `world_size` processes (None: launch.nproc_per_node * launch.nnodes)."""
        p, t = spec.parallel, spec.train
        world = world_size or default_world_size(spec)
        dp = max(1, world // (p.tp * p.pp * p.cp))
        edp = max(1, world // (p.etp * p.ep * p.pp))
        micro = max(1, t.global_batch_size // (t.micro_batch_size * dp))
        return cls(
            world=world, tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, dp=dp, ep=p.ep, etp=p.etp, edp=edp,
            micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size, num_microbatches=micro,
        )

    def grid_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """(spec keys to blame, message) for each process grid that does not divide the world."""
        out = []
        dense, expert = self.tp * self.pp * self.cp, self.etp * self.ep * self.pp
        if self.world % dense:
            out.append((("parallel.tp", "parallel.pp", "parallel.cp", "launch.nproc_per_node"),
                        f"world size {self.world} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = {dense}"))
        if self.world % expert:  # reported too when the dense grid fails: all problems at once
            out.append((("parallel.ep", "parallel.etp", "parallel.pp", "launch.nproc_per_node"),
                        f"world size {self.world} is not divisible by the expert grid etp*ep*pp = "
                        f"{self.etp}*{self.ep}*{self.pp} = {expert}"))
        return out

    def batch_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """(keys, message) when the global batch does not split into micro-batches over dp (and,
        interleaved, into a multiple of pp micro-batches); none while a grid does not divide."""
        if self.grid_problems():
            return []
        per_step = self.micro_batch_size * self.dp
        if self.global_batch_size % per_step:
            return [(("train.global_batch_size", "train.micro_batch_size"),
                     f"train.global_batch_size ({self.global_batch_size}) is not divisible by "
                     f"micro_batch_size*dp = {self.micro_batch_size}*{self.dp} = {per_step}")]
        if self.vpp > 1 and (self.global_batch_size // per_step) % self.pp:
            return [(("train.global_batch_size", "parallel.vpp"),
                     f"interleaved pipeline (vpp = {self.vpp}) needs the number of micro-batches "
                     f"({self.global_batch_size // per_step}) to be a multiple of parallel.pp ({self.pp})")]
        return []

    def check(self) -> "ParallelDims":
        """self, or ValueError naming the sizes when a process grid does not divide the world."""
        problems = self.grid_problems()
        if problems:
            raise ValueError("; ".join(message for _, message in problems))
        return self

    def to_json(self) -> dict:
        """Every size (`dsv4 validate --json`, key `parallel`)."""
        return asdict(self)

    def checkpoint_layout(self) -> dict:
        """The sizes a checkpoint records (dsv4_meta.json `parallel`), compared on resume."""
        return {k: getattr(self, k) for k in ("world", "tp", "pp", "vpp", "cp", "ep", "etp", "dp")}


def single_process_spec(spec: Spec) -> Spec:
    """The spec for one process: every parallel size 1, no sequence parallelism or pp_layout, and
    the same padded vocabulary as under the spec's tp (a checkpoint's embedding rows still fit)."""
    p, m = spec.parallel, spec.model
    return spec.model_copy(update={
        "parallel": p.model_copy(update=dict(
            tp=1, pp=1, vpp=1, cp=1, ep=1, etp=1, sequence_parallel=False, pp_layout=None)),
        "model": m.model_copy(update={"vocab_pad_multiple": m.vocab_pad_multiple * p.tp}),
    })


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


def layer_pipeline_ranks(spec: Spec) -> tuple[list[int], int]:
    """(pipeline rank of each decoder layer, pipeline rank holding the MTP layers): stage i of
    pp_layout, or of the split over pp*vpp stages (the last one shorter when it does not divide),
    lives on pp rank i % pp."""
    m, p = spec.model, spec.parallel
    chunks = p.pp * p.vpp
    if p.pp_layout:
        try:
            stages = parse_pp_layout(p.pp_layout)
        except ValueError:
            stages = []
        ranks = [i % p.pp for i, s in enumerate(stages) for c in s if c == "t"]
        mtp = [i % p.pp for i, s in enumerate(stages) if "m" in s]
        if len(ranks) == m.num_layers:
            return ranks, (mtp[0] if mtp else p.pp - 1)
    per_chunk = max(1, math.ceil(m.num_layers / chunks))
    return [min(i // per_chunk, chunks - 1) % p.pp for i in range(m.num_layers)], p.pp - 1
