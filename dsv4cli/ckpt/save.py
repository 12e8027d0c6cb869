"""Saving a training run in Megatron's torch_dist layout (docs/checkpoints.md), atomically.

    DIR/latest_checkpointed_iteration.txt        "100"
    DIR/iter_0000100/  .metadata, __R_K.distcp, metadata.json, common.pt,
                       dsv4_spec.toml, dsv4_meta.json

A save goes to `DIR/.tmp_iter_0000100.<pid>` first; once every rank has written and the dsv4
files are in, rank 0 renames it to `iter_0000100` and then replaces the tracker file via a
temporary file + os.replace (dsv4cli.ckpt.atomic).

Stored: model (unwrapped module's sharded_state_dict), optimizer (per-parameter keys
`[chained_{i}.]optimizer.state.<exp_avg|exp_avg_sq>.<param key>`; the distributed optimizer writes
megatron's `fully_reshardable` format, the same keys plus `optimizer.state.param.<param key>`, so it
reshards across TP/PP/DP; resumed through ckpt/optimizer_resume.py), scheduler, data position,
tokens seen and per-rank RNG state.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from dsv4cli.ckpt import atomic
from dsv4cli.ckpt.layout import META_FILE, SPEC_FILE, iter_dir_name
from dsv4cli.compat import device


@dataclass
class TrainProgress:
    iteration: int = 0
    consumed_samples: int = 0
    tokens_seen: int = 0


def model_sharded_sd(chunks) -> dict:
    """The unwrapped model chunks' sharded state dict: {"model": ..} or {"model0": .., "model1": ..} (VPP)."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_checkpoint(run_dir: str | Path, chunks, optimizer, scheduler, progress: TrainProgress,
                    spec_toml: str, layout: dict, keep_last: int = 0, sharded_strategy=None) -> Path:
    """Collective save of model/optimizer/scheduler/progress/RNG to run_dir/iter_XXXXXXX (atomic).

    `chunks` are the unwrapped model chunks (no DDP wrapper); `optimizer`/`scheduler` may be None.
    `sharded_strategy`: megatron's save strategy for the tensors (None: its torch_dist default;
    import-hf passes one that makes each tensor on demand, infer/stream_save.py).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from dsv4cli.ckpt.provenance import build_meta
    from dsv4cli.ckpt.rng_state import rng_state

    run_dir = Path(run_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    token = [f"{os.getpid()}"]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_tmp(run_dir)
    dist.broadcast_object_list(token, src=0)
    tmp = atomic.tmp_dir_for(run_dir, progress.iteration, token[0])
    if rank == 0:
        tmp.mkdir(parents=True)
    dist.barrier()

    state = model_sharded_sd(chunks)
    if optimizer is not None:
        from dsv4cli.ckpt.adam_state import optimizer_sharded_sd

        state["optimizer"] = optimizer_sharded_sd(optimizer, state)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["progress"] = {
        "iteration": progress.iteration,
        "consumed_samples": progress.consumed_samples,
        "tokens_seen": progress.tokens_seen,
    }
    state["rng_state"] = ShardedObject("rng_state", rng_state(), (world,), (rank,), replica_id=0)
    dist_checkpointing.save(state, str(tmp), sharded_strategy=sharded_strategy)
    dist.barrier()
    final = run_dir / iter_dir_name(progress.iteration)
    if rank == 0:
        (tmp / SPEC_FILE).write_text(spec_toml)
        meta = build_meta(spec_toml, layout, progress.iteration, progress.tokens_seen, progress.consumed_samples)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        final = atomic.publish(tmp, run_dir, progress.iteration)
        atomic.prune(run_dir, keep_last)
    dist.barrier()
    device.synchronize()
    return final
