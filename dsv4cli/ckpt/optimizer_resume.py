"""Resuming optimizer state: the sharded state dict to load, checked against the checkpoint first.

Megatron's per-parameter optimizer formats (dsv4cli.ckpt.keys) are keyed by the model's
layout-independent tensor keys, so they reshard across TP, PP, EP and DP changes like the model.
A ChainedOptimizer (MoE: dense + expert groups) stores them with or without `chained_{i}.`
prefixes, and a pipeline stage without experts has no ChainedOptimizer at all, so a checkpoint
can mix both forms: each requested per-parameter key is pointed at the stored entry of the
same (state, parameter), whatever its prefix. Formats tied to one layout (the
distributed optimizer's bucket space) do not reshard: every tensor and object the optimizer
requests is compared with the checkpoint's `.metadata` before anything is read, and a mismatch
is bad input (exit 2) that names the fix, `checkpoint.load_optimizer = false`, instead of a
traceback from deep inside the load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dsv4cli.ckpt.errors import CheckpointError

FRESH_OPTIMIZER_HINT = (
    "resume with a fresh optimizer (weights, step, learning-rate schedule and data position are kept): "
    "--set checkpoint.load_optimizer=false (or load_optimizer = false under [checkpoint] in the spec)"
)
_SHOWN = 3


def stored_optimizer_names(iter_dir: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The checkpoint's optimizer tensors {key: global shape} and object names (`key/shard_...`)."""
    from dsv4cli.ckpt.keys import is_optimizer_key
    from dsv4cli.ckpt.metadata import stored_names

    tensors, objects = stored_names(iter_dir)
    return ({k: v for k, v in tensors.items() if is_optimizer_key(k)},
            {k for k in objects if is_optimizer_key(k)})


def resolve_keys(sharded_sd, stored: dict[str, tuple[int, ...]]) -> None:
    """Point every requested per-parameter key (in place) at the stored entry of the same state and
    parameter, with or without a `chained_{i}.` prefix; other keys stay as they are."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from dsv4cli.ckpt.keys import parse_optimizer_key

    by_param = {}
    for name in sorted(stored):
        if (k := parse_optimizer_key(name)) is not None:
            by_param.setdefault((k.state, k.param), name)
    for v in nested_values(sharded_sd):
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and v.key not in stored:
            if (k := parse_optimizer_key(v.key)) is not None:
                v.key = by_param.get((k.state, k.param), v.key)


def requested_names(sharded_sd) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Tensor keys {key: global shape} and object names a sharded state dict asks for (not consumed)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    tensors, objects = {}, set()
    todo = list(nested_values(sharded_sd))
    while todo:
        v = todo.pop()
        if isinstance(v, ShardedTensorFactory):
            built = v.build()
            todo.extend(nested_values(built) if isinstance(built, (dict, list)) else [built])
        elif isinstance(v, ShardedTensor):
            tensors[v.key] = tuple(v.global_shape)
        elif isinstance(v, ShardedObject):
            objects.add(v.unique_key)
    return tensors, objects


def mismatch_lines(stored: dict, stored_objects: set, wanted: dict, wanted_objects: set) -> list[str]:
    """'missing: KEY [shape]' / 'mis-shaped: KEY: checkpoint [..], optimizer [..]' for what the load needs."""
    lines = [f"missing: {k} {list(wanted[k])}" for k in sorted(set(wanted) - set(stored))]
    lines += [f"mis-shaped: {k}: checkpoint {list(stored[k])}, optimizer {list(wanted[k])}"
              for k in sorted(set(wanted) & set(stored)) if stored[k] != wanted[k]]
    lines += [f"missing: {k}" for k in sorted(wanted_objects - stored_objects)]
    return lines


def chain_length(optimizer_common) -> int:
    """Inner optimizers of a saved ChainedOptimizer, from common.pt's `optimizer` entry ({0: .., 1: ..})."""
    if isinstance(optimizer_common, dict) and optimizer_common and all(isinstance(k, int) for k in optimizer_common):
        return len(optimizer_common)
    return 1


def _saved_step(optimizer_common):
    """Adam's step count as saved (`common_step`; the inner optimizers of a chain keep theirs in sync)."""
    if isinstance(optimizer_common, dict):
        if "common_step" in optimizer_common:
            return optimizer_common["common_step"]
        for v in optimizer_common.values():
            if (step := _saved_step(v)) is not None:
                return step
    return None


def _set_step(state_dict, step) -> None:
    """Put `common_step` into every torch optimizer state dict (dicts with 'state' and 'param_groups')."""
    if isinstance(state_dict, dict):
        if "state" in state_dict and "param_groups" in state_dict:
            state_dict["state"]["common_step"] = step
        for v in state_dict.values():
            _set_step(v, step)


@dataclass
class OptimizerRequest:
    """What load_checkpoint asks dist_checkpointing for (`state[key] = sharded`), and how to apply it.

    When the saved chain of optimizers differs from this run's (MoE: expert parameters have their own
    optimizer only with ep > 1), the per-parameter tensors still load by key, but common.pt's param
    groups have the saved structure: they are taken from this run's optimizer (same spec: the
    scheduler sets lr and weight decay) and only Adam's step count from the checkpoint.
    """

    key: str
    sharded: dict
    local: Optional[dict] = None  # this run's non-tensor state (regrouped loads only)
    step: object = None

    def load_into(self, optimizer, loaded: dict, iter_dir: Path) -> None:
        """Apply the loaded state; a structure megatron cannot apply is bad input (CheckpointError)."""
        from megatron.core.dist_checkpointing.dict_utils import merge

        state = loaded[self.key]
        try:
            if self.local is not None:
                state = merge(self.local, state)
                if self.step is not None:
                    _set_step(state, self.step)
            optimizer.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{iter_dir}: its optimizer state does not fit this run's optimizer "
                                  f"({type(e).__name__}: {e}); {FRESH_OPTIMIZER_HINT}") from None


def optimizer_request(optimizer, model_sd: dict, iter_dir: Path, saved_layout, layout: dict, common: dict,
                      metadata: Optional[dict] = None) -> OptimizerRequest:
    """Collective: optimizer_sharded_state, keyed for a direct or a regrouped load (OptimizerRequest).
    `common`: the checkpoint's common state (common.pt), as the caller already loaded it."""
    from megatron.core.dist_checkpointing.utils import extract_nonpersistent, extract_sharded_base

    sd = optimizer_sharded_state(optimizer, model_sd, iter_dir, saved_layout, layout, metadata)
    saved = common.get("optimizer")
    if chain_length(saved) == len(getattr(optimizer, "chained_optimizers", [optimizer])):
        return OptimizerRequest("optimizer", sd)
    _, local = extract_sharded_base(sd)
    _, local = extract_nonpersistent(local)
    return OptimizerRequest("optimizer_regrouped", sd, local, _saved_step(saved))


def optimizer_sharded_state(optimizer, model_sd: dict, iter_dir: Path, saved_layout, layout: dict,
                            metadata: Optional[dict] = None) -> dict:
    """Collective: the optimizer's sharded state dict for loading `iter_dir`, checked on every rank.

    `metadata` goes to megatron's optimizer.sharded_state_dict (e.g. the distributed optimizer's
    `distrib_optim_sharding_type`); per-parameter keys are requested unprefixed, then resolved.

    Raises CheckpointError (all ranks alike) when the checkpoint lacks or mis-shapes anything requested.
    """
    import torch.distributed as dist

    stored, stored_objects = stored_optimizer_names(iter_dir)
    md = {"chained_optim_avoid_prefix": True, **(metadata or {})}
    sd = optimizer.sharded_state_dict(dict(model_sd), is_loading=True, metadata=md)
    resolve_keys(sd, stored)
    wanted, wanted_objects = requested_names(sd)
    lines = mismatch_lines(stored, stored_objects, wanted, wanted_objects)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, lines)
    lines = sorted({x for g in gathered for x in g})
    if lines:
        moved = bool(saved_layout) and saved_layout != layout
        where = f" (saved under {_layout_text(saved_layout)}, resumed under {_layout_text(layout)})" if moved else ""
        shown = "; ".join(lines[:_SHOWN]) + (f"; ... ({len(lines) - _SHOWN} more)" if len(lines) > _SHOWN else "")
        raise CheckpointError(
            f"{iter_dir}: its optimizer state does not fit this run's optimizer{where}: {len(lines)} problems "
            f"({shown}); {FRESH_OPTIMIZER_HINT}" + (", or resume under the layout it was saved with" if moved else "")
        )
    return sd


def _layout_text(layout) -> str:
    if not isinstance(layout, dict):
        return "an unknown layout"
    return " ".join(f"{k} {layout[k]}" for k in ("world", "tp", "pp", "ep", "dp") if k in layout)
