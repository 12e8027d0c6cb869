"""Optimizer state in checkpoints: the distributed optimizer's format, and Adam state across optimizers.

Both megatron optimizers dsv4 builds store Adam's moments per parameter, with the model's keys and
shapes: `optimizer.state.exp_avg.<param key>` and `optimizer.state.exp_avg_sq.<param key>` (prefixed
`chained_{i}.` when MoE with expert parallelism chains a dense and an expert optimizer). The
distributed optimizer, in megatron's `fully_reshardable` format, adds the fp32 main parameter
`optimizer.state.param.<param key>` and keeps Adam's step in its param groups (`common.pt`); the
plain optimizer keeps it as `common_step`. So a checkpoint of either resumes with the other
(`train.distributed_optimizer` changed): this rank's slice of every moment is read per parameter,
the step comes from `common.pt` and the main parameters are the (loaded) model weights.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from dsv4cli.ckpt.errors import CheckpointError

# The distributed optimizer's checkpoint format: per-parameter tensors of the model's shapes
# (gathered over DP at save, sliced per rank at load). Its default `fully_sharded_model_space`
# needs ShardedTensor.flattened_range, which megatron-core 0.16 no longer supports.
DISTOPT_SHARDING = "fully_reshardable"
_MOMENTS = ("exp_avg", "exp_avg_sq")


class OptimizerStateError(CheckpointError):
    """Optimizer state this run cannot take over (exit 2)."""


def inner_optimizers(optimizer) -> list:
    """The megatron optimizers inside a ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in inner_optimizers(optimizer))


def optimizer_sharded_sd(optimizer, model_sd: dict, is_loading: bool = False, sharding: Optional[str] = None):
    """optimizer.sharded_state_dict with the distributed optimizer's format (ignored by the others)."""
    return optimizer.sharded_state_dict(dict(model_sd), is_loading=is_loading,
                                        metadata={"distrib_optim_sharding_type": sharding or DISTOPT_SHARDING})


def _walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` anywhere in nested dicts/lists."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _walk(v, key)


def saved_sharding(common: dict) -> Optional[str]:
    """The distributed optimizer's `param_state_sharding_type` in common.pt; None for the plain optimizer."""
    found = {v for v in _walk(common.get("optimizer"), "param_state_sharding_type") if isinstance(v, str)}
    return sorted(found)[0] if found else None


def saved_adam_step(common: dict) -> float:
    """Adam's step count from common.pt (plain: `common_step`; distributed: the param groups' `step`)."""
    opt = common.get("optimizer")
    values = {float(v) for v in _walk(opt, "common_step")} | {float(v) for v in _walk(opt, "step")}
    if len(values) != 1:
        raise OptimizerStateError(f"optimizer state: expected one Adam step in common.pt, found {sorted(values)}")
    return values.pop()


def _local_params(opt) -> list:
    """Model parameters whose Adam state this rank holds in `opt` (all, or its DP shard's)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer

    if isinstance(opt, DistributedOptimizer):
        return list(opt.model_param_gbuf_map)
    if isinstance(opt, FP32Optimizer):
        return [p for g in opt.optimizer.param_groups for p in g["params"]]
    raise OptimizerStateError(
        f"optimizer state cannot be moved into {type(opt).__name__} (another train.distributed_optimizer "
        "or precision than the checkpoint's); resume with the checkpoint's settings")


def load_across(iter_dir, model_sd: dict, optimizer, common: dict) -> None:
    """Collective: Adam state of a checkpoint written by the other kind of optimizer into `optimizer`.

    `model_sd`: a fresh sharded state dict of the model (its tensors are the parameters). Call after
    the model weights are loaded (they become the distributed optimizer's main params).
    """
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    if saved_sharding(common) not in (None, DISTOPT_SHARDING):
        raise OptimizerStateError(
            f"optimizer state is in the distributed optimizer's {saved_sharding(common)!r} format, which only "
            "the distributed optimizer reads: set train.distributed_optimizer = \"on\"")
    step = saved_adam_step(common)
    shards, _ = extract_sharded_tensors_and_factories(model_sd)
    by_param = {id(st.data): st for st in nested_values(shards)}
    opts = inner_optimizers(optimizer)
    request, targets = {}, []
    for i, opt in enumerate(opts):
        prefix = f"chained_{i}.optimizer.state" if len(opts) > 1 else "optimizer.state"
        for p in _local_params(opt):
            st = by_param[id(p)]
            request[len(targets)] = {m: make_sharded_optimizer_tensor(st, torch.empty_like(p, dtype=torch.float32),
                                                                      f"{prefix}.{m}") for m in _MOMENTS}
            targets.append((opt, p))
    loaded = dist_checkpointing.load(request, str(iter_dir))
    with torch.no_grad():
        for n, (opt, p) in enumerate(targets):
            _set_adam_state(opt, p, {m: loaded[n][m] for m in _MOMENTS}, step)


def _set_adam_state(opt, model_param, moments: dict, step: float) -> None:
    """One parameter's Adam state (full local tensors) into a plain or distributed optimizer."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if isinstance(opt, DistributedOptimizer):
        r = opt._get_model_param_range_map(model_param)["param"]
        gi, go = opt.model_param_group_index_map[model_param]
        group = opt.optimizer.param_groups[gi]
        main = group["params"][go]
        tensors = {"param": model_param.detach().view(-1)[r.start:r.end]}
        tensors.update({m: t.reshape(-1)[r.start:r.end] for m, t in moments.items()})
    else:
        group = next(g for g in opt.optimizer.param_groups if any(q is model_param for q in g["params"]))
        main = model_param
        tensors = dict(moments)
    state = opt.optimizer.state[main]
    for m in _MOMENTS:
        state[m] = torch.zeros_like(main, dtype=torch.float32)
    if isinstance(opt, DistributedOptimizer):
        opt._set_main_param_and_optimizer_states(model_param, tensors)
    else:
        for m in _MOMENTS:
            state[m].copy_(tensors[m].view_as(main))
    if isinstance(opt.optimizer, torch.optim.Adam):
        state["step"] = torch.tensor(step, dtype=torch.float32)
    else:  # TE/apex FusedAdam keep the step in the param group
        group["step"] = int(step)
