"""Loading a checkpoint into a training run (resume) or into a model (eval): collective, any parallel layout.

Model tensors reshard on load (torch_dist). Optimizer state loads through ckpt/optimizer_resume.py
(checked against `.metadata` first), or through ckpt/adam_state.py when the checkpoint was written by
the other kind of optimizer (train.distributed_optimizer switched). The RNG state is restored only
under the layout it was saved with.
"""

from __future__ import annotations

from pathlib import Path

from dsv4cli.ckpt.layout import read_meta
from dsv4cli.ckpt.save import TrainProgress, model_sharded_sd


def has_optimizer_state(iter_dir: Path) -> bool:
    from dsv4cli.ckpt.keys import is_optimizer_key
    from dsv4cli.ckpt.metadata import stored_tensors

    return any(is_optimizer_key(k) for k in stored_tensors(iter_dir))


def _into_chunks(chunks, loaded: dict) -> None:
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])


def load_checkpoint(iter_dir: Path, chunks, optimizer, scheduler, layout: dict,
                    load_optimizer: bool = True) -> tuple[TrainProgress, list[str]]:
    """Collective load into the unwrapped chunks (+ optimizer/scheduler/RNG when present).

    -> (progress, notes). Notes say what was not restored (no optimizer state, other layout).
    """
    from megatron.core import dist_checkpointing

    notes = []
    meta = read_meta(iter_dir)
    model_sd = model_sharded_sd(chunks)
    state = dict(model_sd)
    with_opt = load_optimizer and optimizer is not None and has_optimizer_state(iter_dir)
    if optimizer is not None and load_optimizer and not with_opt:
        notes.append("checkpoint has no optimizer state: starting with a fresh optimizer")
    if optimizer is not None and not load_optimizer:
        notes.append("checkpoint.load_optimizer = false: starting with a fresh optimizer")
    common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    across = False
    if with_opt:
        from dsv4cli.ckpt import adam_state
        from dsv4cli.ckpt.optimizer_resume import optimizer_request

        saved = adam_state.saved_sharding(common)
        across = (saved is not None) != adam_state.is_distributed(optimizer)  # distributed optimizer on <-> off
        if not across:
            opt_request = optimizer_request(
                optimizer, model_sd, iter_dir, meta.get("parallel"), layout, common,
                metadata={"distrib_optim_sharding_type": saved or adam_state.DISTOPT_SHARDING})
            state[opt_request.key] = opt_request.sharded
    same_layout = meta.get("parallel") == layout
    if same_layout:
        import torch.distributed as dist
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        state["rng_state"] = ShardedObject(
            "rng_state", None, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0
        )
    loaded = dist_checkpointing.load(state, str(iter_dir))
    _into_chunks(chunks, loaded)
    if with_opt and not across:
        opt_request.load_into(optimizer, loaded, iter_dir)
    if across:
        adam_state.load_across(iter_dir, model_sharded_sd(chunks), optimizer, common)  # (load consumed model_sd)
        kind = "distributed" if saved is not None else "plain"
        notes.append(f"optimizer state taken over from the {kind} optimizer that wrote the checkpoint")
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if same_layout and loaded.get("rng_state") is not None:
        from dsv4cli.ckpt.rng_state import set_rng_state

        set_rng_state(loaded["rng_state"])
    prog = common.get("progress", {})
    progress = TrainProgress(
        iteration=int(prog.get("iteration", meta.get("iteration", 0))),
        consumed_samples=int(prog.get("consumed_samples", meta.get("consumed_samples", 0))),
        tokens_seen=int(prog.get("tokens_seen", meta.get("tokens_seen", 0))),
    )
    return progress, notes


def load_model_weights(iter_dir: Path, chunks) -> None:
    """Model weights only (for eval)."""
    from megatron.core import dist_checkpointing

    _into_chunks(chunks, dist_checkpointing.load(model_sharded_sd(chunks), str(iter_dir)))
