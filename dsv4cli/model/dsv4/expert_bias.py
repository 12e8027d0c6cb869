"""The no-aux-loss expert-bias update of DeepSeek-V4's top-k routers, once per training step.

Every `SqrtSoftplusTopKRouter` counts the tokens it sends to each expert while gradients are on
(`local_tokens_per_expert` [E]); after the optimizer step (`update_expert_bias`):

    counts  = sum of local_tokens_per_expert over the TP x DP x CP ranks     [L, E]  (L: this rank's routers)
    bias   += rate * sign(mean(counts, experts) - counts)                    [L, E]
    local_tokens_per_expert = 0

which is megatron-core's `get_updated_expert_bias` with the group it reduces over
(`get_tensor_and_data_parallel_group(with_context_parallel=True)`: every rank of this pipeline
stage, the expert-parallel ranks included). Megatron runs it only when
`moe_router_enable_expert_bias`, which its config refuses without sigmoid scores, hence this module;
the rate is megatron's `moe_router_bias_update_rate` (spec `model.moe.expert_bias_update_rate`,
0 = frozen: counts still reset and loads still reported). All replicas see the same summed counts,
so all hold the same bias. Hash-routed layers have a fixed table and no bias.

The same summed counts give each layer's load balance, max(counts) / mean(counts) (1 = even),
brought from every pipeline stage so every rank returns the figures of all biased layers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv4cli.model.dsv4.router import SqrtSoftplusTopKRouter


def biased_routers(chunks: list) -> list[SqrtSoftplusTopKRouter]:
    """This rank's routers with an expert bias (all model chunks), in layer order. The training loop
    collects them once (dsv4cli.train.step) and passes them to `update_expert_bias`."""
    routers = [m for c in chunks for m in c.modules() if isinstance(m, SqrtSoftplusTopKRouter)]
    return sorted(routers, key=lambda r: r.layer_number or 0)


def updated_bias(counts: torch.Tensor, bias: torch.Tensor, rate: float) -> torch.Tensor:
    """counts [L, E], bias [L, E] -> bias + rate * sign(mean load - load) [L, E]."""
    mean = counts.sum(dim=-1, keepdim=True) / counts.shape[-1]
    return bias + torch.sign(mean - counts) * rate


def max_over_mean(counts: torch.Tensor) -> torch.Tensor:
    """counts [L, E] -> the busiest expert's load over the mean load [L] (0 where no tokens)."""
    mean = counts.sum(dim=-1) / counts.shape[-1]
    return counts.max(dim=-1).values / mean.clamp(min=1e-12)


def _routing_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)


def _all_layers(routers: list, figures: torch.Tensor, num_slots: int) -> list[float]:
    """Per-router figures [L] of this stage -> those of every stage's biased layers, in layer order."""
    from megatron.core import parallel_state as ps

    slots = torch.full((num_slots,), -1.0, dtype=torch.float64)
    for r, v in zip(routers, figures.tolist()):
        slots[r.layer_number - 1] = v
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        from dsv4cli.compat.device import current_device

        on = slots.to(current_device())
        dist.all_reduce(on, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
        slots = on.cpu()
    return [v for v in slots.tolist() if v >= 0]


def has_expert_bias(config) -> bool:
    """True when the model's top-k routers are DeepSeek-V4's (with an expert bias)."""
    return bool(getattr(config, "num_moe_experts", None)) and config.moe_router_score_function == "sqrtsoftplus"


def update_expert_bias(routers: list, config, frozen: bool = False) -> list[float]:
    """Sum this step's counts of `routers` (this rank's `biased_routers`) over the routing ranks,
    move every bias by the config's `moe_router_bias_update_rate` against its load (not when
    `frozen`: the indexer's dense warm-up keeps the rest of the model fixed), reset the counts.
    -> max/mean load of every biased layer of the model (all stages), in layer order.

    Like megatron's `_update_router_expert_bias(model, config)`; every rank must call it
    (collectives), also ranks without biased routers."""
    rate = 0.0 if frozen else float(config.moe_router_bias_update_rate or 0.0)
    num_layers = config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)
    figures = torch.zeros(0, dtype=torch.float64)
    if routers:
        with torch.no_grad():
            counts = torch.stack([r.local_tokens_per_expert.float() for r in routers])
            if dist.is_initialized() and dist.get_world_size(_routing_group()) > 1:
                dist.all_reduce(counts, group=_routing_group())
            if rate > 0:
                new = updated_bias(counts, torch.stack([r.expert_bias for r in routers]), rate)
                for r, b in zip(routers, new):
                    r.expert_bias.copy_(b)
            for r in routers:
                r.local_tokens_per_expert.zero_()
            figures = max_over_mean(counts).double().cpu()
    return _all_layers(routers, figures, num_layers)
