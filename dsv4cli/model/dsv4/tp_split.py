"""Tensor parallelism of DeepSeek-V4 attention: what is split over the TP ranks, what is replicated.

    split by head (rank r holds heads r*H/T .. (r+1)*H/T - 1, output groups r*G/T .., indexer heads
    r*H_I/T ..): linear_q_up, linear_o_down and the sinks (rows), linear_o_up (columns), the
    indexer's linear_q_up and linear_weights (rows)
    replicated: linear_q_down, q_norm, linear_kv, kv_norm, the compressors (all of them)

A split weight is drawn whole from the default generator and sliced, so a fresh TP=T model equals
the TP=1 one. The replicated modules' outputs feed every local head: `copy_to` (identity forward,
all-reduce backward) on them makes their gradients the sum over all heads on every rank, so the
replicated parameters hold the TP=1 gradient on each rank and need no reduction afterwards.
Under sequence parallelism the layer gathers its input sequence (backward: the rank's slice of the
then identical input gradient) and reduce-scatters its output; without it, the output is all-reduced.

`chain_sum` adds per-head tensors left to right in head order across the ranks (rank r continues
rank r-1's partial sum), so the sum is the one process's bit for bit (the indexer's top-k choice)
with one [s, b, n] tensor per rank in flight. `gather_heads` concatenates small per-head tensors of
all ranks in rank (= head) order. With one rank (or no megatron process groups at all) everything
here is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class TpGroup:
    """The tensor-parallel group of a module: `size` ranks, this one `rank`; `group` None when size 1."""

    group: Any = None
    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False

    def split(self, total: int, what: str) -> int:
        """The local count of `total` things split over the ranks (a clear error when it does not divide)."""
        if total % self.size:
            raise ValueError(f"tensor parallelism {self.size} does not divide {what} ({total})")
        return total // self.size


def tp_group(config, pg_collection=None) -> TpGroup:
    """This process's TP group: pg_collection.tp, else megatron's global one, else none (size 1)."""
    from megatron.core import parallel_state

    group = getattr(pg_collection, "tp", None)
    if group is None and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tensor_model_parallel_group()
    if group is None or torch.distributed.get_world_size(group) == 1:
        return TpGroup()
    return TpGroup(group, torch.distributed.get_world_size(group), torch.distributed.get_rank(group),
                   bool(config.sequence_parallel))


def split_linear(config, out_features: int, in_features: int, tp: TpGroup, dim: int, init=None) -> torch.nn.Linear:
    """A bias-free linear holding this rank's slice (`dim` 0: rows, 1: columns) of an [out, in]
    weight drawn whole with megatron's init method (so every layout draws the TP=1 weight); tagged
    for megatron (tensor_model_parallel, partition_dim) when split, TP = 1 builds what it always built."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    from dsv4cli.model.dsv4.compressor import linear_weight

    layer = linear_weight(config, out_features, in_features, init)
    if tp.size > 1:
        layer.weight = torch.nn.Parameter(layer.weight.detach().chunk(tp.size, dim=dim)[tp.rank].clone())
        set_tensor_model_parallel_attributes(layer.weight, True, dim, 1)
    return layer


def split_parameter(full: Tensor, tp: TpGroup, dim: int = 0) -> torch.nn.Parameter:
    """This rank's slice of `full` along `dim` as a parameter (TP-tagged when split)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if tp.size == 1:
        return torch.nn.Parameter(full)
    param = torch.nn.Parameter(full.chunk(tp.size, dim=dim)[tp.rank].clone())
    set_tensor_model_parallel_attributes(param, True, dim, 1)
    return param


class _SumGradOverTp(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient. megatron's copy_to_tensor_model_parallel_region
    does the same but reduces `grad.contiguous()` and returns the unreduced grad when that is a copy
    (einsum backward gives non-contiguous grads here)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to(x: Tensor, tp: TpGroup) -> Tensor:
    """A replicated tensor entering head-split work: identity forward, all-reduce of its grad backward."""
    return x if tp.size == 1 else _SumGradOverTp.apply(x, tp.group)


def full_sequence(x: Tensor, tp: TpGroup) -> Tensor:
    """The layer input [s / T, b, h] (sequence parallel) -> [s, b, h]; its gradient is identical on
    every rank (all head-split work is behind `copy_to`), so backward takes this rank's slice."""
    if tp.size == 1 or not tp.sequence_parallel:
        return x
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=tp.group)


def combine_output(y: Tensor, tp: TpGroup) -> Tensor:
    """Per-rank partial sums [s, b, h] of the output projection -> the sum: all-reduced, or
    reduce-scattered to [s / T, b, h] under sequence parallelism."""
    if tp.size == 1:
        return y
    from megatron.core.tensor_parallel import (
        reduce_from_tensor_model_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    if tp.sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(y, group=tp.group)
    return reduce_from_tensor_model_parallel_region(y, group=tp.group)


def gather_heads(x: Tensor, tp: TpGroup) -> Tensor:
    """[H / T, ...] per-head values of this rank -> [H, ...] of all ranks in head order (backward:
    this rank's slice of the gradient). For small values: every rank holds all of them."""
    if tp.size == 1:
        return x.contiguous()
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(x.contiguous(), tensor_parallel_output_grad=False, group=tp.group)


class _TakeTotal(torch.autograd.Function):
    """forward(partial, total) = total; backward hands the total's gradient to `partial` unchanged
    (d total / d partial is the identity; every rank computes the same loss of the total)."""

    @staticmethod
    def forward(ctx, partial: Tensor, total: Tensor) -> Tensor:
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def chain_sum(terms: Iterable[Tensor], tp: TpGroup) -> Tensor:
    """sum over all ranks' local terms (each [...], same shape and dtype on every rank), accumulated
    left to right in rank-then-local order: acc = t_0; acc = acc + t_1; ... Rank r > 0 receives
    rank r-1's partial sum before adding its own terms and sends its partial on (so the ranks run one
    after another), the last rank broadcasts the total. The result is the one-process chain bit for
    bit on every rank; the memory in flight is one term-sized tensor. Backward: each local term gets
    the total's gradient (no communication). `terms` may be a generator: computed as they are added."""
    terms = iter(terms)
    acc = next(terms)
    if tp.size > 1 and tp.rank > 0:
        before = torch.empty(acc.shape, dtype=acc.dtype, device=acc.device)
        torch.distributed.recv(before, src=torch.distributed.get_global_rank(tp.group, tp.rank - 1), group=tp.group)
        acc = before + acc
    for term in terms:
        acc = acc + term
    if tp.size == 1:
        return acc
    last = tp.size - 1
    if tp.rank < last:
        torch.distributed.send(acc.detach().contiguous(), dst=torch.distributed.get_global_rank(tp.group, tp.rank + 1),
                               group=tp.group)
    total = acc.detach().contiguous() if tp.rank == last else torch.empty(acc.shape, dtype=acc.dtype, device=acc.device)
    torch.distributed.broadcast(total, src=torch.distributed.get_global_rank(tp.group, last), group=tp.group)
    return acc if tp.rank == last else _TakeTotal.apply(acc, total)


class TpShardedState:
    """Mixin for a MegatronModule: `TP_AXES` {parameter name: split axis} of its own (non-child-module)
    split tensors are saved as TP-sharded ShardedTensors (global shape, this rank's offset), so a
    checkpoint written under one TP size loads under another; the rest stays as megatron saves it."""

    TP_AXES: dict[str, int] = {}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.tp.size == 1:  # exactly what TP=1 always wrote
            return out
        params = dict(self.named_parameters())
        split = {name: params[name] for name in self.TP_AXES if name in params}
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out.update(make_sharded_tensors_for_checkpoint(split, prefix, dict(self.TP_AXES), sharded_offsets,
                                                       tp_group=self.tp.group, dp_cp_group=metadata["dp_cp_group"]))
        return out
