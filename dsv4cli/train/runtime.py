"""Per-process runtime: this rank's model chunks under DDP, optimizer, scheduler and the schedules
(the process group, parallel state and chunks come from dsv4cli.build.parallel).

Everything here is megatron-core's own machinery (parallel_state, DistributedDataParallel,
get_megatron_optimizer, OptimizerParamScheduler, get_forward_backward_func); this module only
wires it up from a spec, the way Megatron-LM's `training.py` does.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist

from dsv4cli.build.parallel import build_model_chunks, initialize_parallel
from dsv4cli.compat.device import cuda_available, current_device
from dsv4cli.spec.layout import ParallelDims


def set_seed(seed: int) -> None:
    """Same seed on every rank (with CPU initialisation weights do not depend on TP)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def use_bf16(spec) -> bool:
    return spec.train.precision == "bf16" and cuda_available()


def run_settings(spec, dims: ParallelDims):
    """This run's GpuSettings (dsv4cli.build.gpu_settings): fusions, overlap, data feeding."""
    from dsv4cli.build.gpu_settings import gpu_settings, probe

    return gpu_settings(spec, probe(), dp=dims.dp, virtual_stages=dims.vpp)


def use_distributed_optimizer(spec, dims: ParallelDims) -> bool:
    """'on' = on (GPU and CPU); 'auto' = on with CUDA and dp > 1, off on CPU."""
    return run_settings(spec, dims).distributed_optimizer


def _announce(settings) -> None:
    """Rank 0 prints what the machine lacks (e.g. Transformer Engine on CUDA) once, at start."""
    import sys

    if not dist.is_initialized() or dist.get_rank() == 0:
        for w in settings.warnings:
            print(f"warning: {w}", file=sys.stderr, flush=True)


@dataclass
class Runtime:
    spec: object
    dims: ParallelDims  # its checkpoint_layout() is what checkpoints record
    chunks: list  # unwrapped modules (checkpointing, eval)
    model: list  # DDP-wrapped modules (training)
    config: object
    optimizer: Optional[object] = None
    scheduler: Optional[object] = None
    settings: Optional[object] = None  # GpuSettings


def build_runtime(spec, with_optimizer: bool = True) -> Runtime:
    """Parallel state, seeded model chunks, DDP wrappers and (optionally) optimizer + scheduler."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.utils import get_model_config

    from dsv4cli.build.optimizer import optimizer_config, param_group_overrides, param_scheduler

    dims = initialize_parallel(spec)
    set_seed(spec.train.seed)
    chunks = build_model_chunks(spec)
    bf16 = use_bf16(spec)
    wrapped = chunks
    if bf16:
        from megatron.core.transformer.module import Float16Module

        wrapped = [Float16Module(c.config, c) for c in chunks]
    settings = run_settings(spec, dims)
    _announce(settings)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=bf16, check_for_nan_in_grad=False, **settings.ddp)
    model = [
        DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=w, disable_bucketing=(i > 0))
        for i, (c, w) in enumerate(zip(chunks, wrapped))
    ]
    config = get_model_config(model[0])  # overlap_p2p_comm on CPU with VPP: gpu_settings, via transformer_config
    rt = Runtime(spec=spec, dims=dims, chunks=chunks, model=model, config=config, settings=settings)
    if not with_optimizer:
        return rt
    opt_config = optimizer_config(spec, bf16, settings.optimizer)
    rt.optimizer = get_megatron_optimizer(opt_config, model,
                                          config_overrides=param_group_overrides(spec, opt_config, chunks))
    rt.scheduler = param_scheduler(spec, rt.optimizer)
    config.grad_scale_func = rt.optimizer.scale_loss
    set_sync_funcs(config, model, settings)
    config.finalize_model_grads_func = finalize_model_grads
    return rt


def set_sync_funcs(config, model: list, settings) -> None:
    """The schedule's hooks into DDP, as Megatron-LM sets them: no_sync always; with overlapped
    gradient reduce each chunk's reduce starts when its backward ends (align_grad_reduce); with
    aligned parameter gathers (VPP) each chunk's gather starts before its forward."""

    def per_chunk(funcs: list):
        return funcs if len(funcs) > 1 else funcs[0]

    config.no_sync_func = per_chunk([m.no_sync for m in model])
    if settings.ddp["overlap_grad_reduce"]:
        config.grad_sync_func = per_chunk([m.start_grad_sync for m in model])
    if settings.ddp["align_param_gather"]:
        config.param_sync_func = per_chunk([m.start_param_sync for m in model])


@contextmanager
def params_synced(rt: Runtime):
    """Model parameters complete on every rank inside (checkpoint saving, evaluation).

    With overlap_param_gather the distributed optimizer's parameter all-gather runs in the next
    forward's pre-hooks, so right after a step the parameters this rank does not own are stale:
    as Megatron-LM, gather them synchronously and pause the hooks meanwhile. No-op otherwise.
    """
    overlap = rt.settings is not None and rt.settings.ddp["overlap_param_gather"]
    if overlap:
        for m in rt.model:
            m.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        if overlap:
            for m in rt.model:
                m.enable_forward_pre_hook()


# --------------------------------------------------------------------------- forward / loss


def _to_device(a):
    """numpy array or tensor [b, s] -> tensor on the model's device (None stays None: a middle stage)."""
    if a is None:
        return None
    t = a if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a))
    return t.cuda(non_blocking=True) if cuda_available() and not t.is_cuda else t


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token losses [b, s] -> masked mean (megatron divides it by the micro-batch count)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    """megatron forward_step_func: one micro-batch -> (per-token loss [b, s], loss_func)."""
    mb = next(data_iterator)
    tokens = _to_device(mb["tokens"])
    labels = _to_device(mb["labels"])
    loss_mask = _to_device(mb["loss_mask"])
    position_ids = _to_device(mb["position_ids"])
    output = model(tokens, position_ids, attention_mask=None, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def run_microbatches(rt: Runtime, batches: list[dict], forward_only: bool) -> list[dict]:
    """megatron's pipeline schedule over this rank's micro-batches -> loss dicts (last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    if not forward_only:
        set_indexer_loss_scale(rt.config, len(batches))
    iters = [iter(batches) for _ in rt.model] if len(rt.model) > 1 else iter(batches)
    s = rt.spec.model.seq_length
    return fb(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=rt.model,
        num_microbatches=len(batches),
        seq_length=s,
        micro_batch_size=rt.spec.train.micro_batch_size,
        decoder_seq_length=s,
        forward_only=forward_only,
    )


def set_indexer_loss_scale(config, num_microbatches: int) -> None:
    """The indexer loss's backward scale, the main loss's: optimizer loss scale / micro-batches
    (megatron's schedule does the same for its MoE auxiliary and MTP losses)."""
    from dsv4cli.model.dsv4.indexer_loss import IndexerLossAutoScaler

    one = torch.ones(1, device=current_device())
    scale = config.grad_scale_func(one) if config.grad_scale_func is not None else one
    IndexerLossAutoScaler.set_loss_scale(scale / max(num_microbatches, 1))


def take_mtp_losses(depth: int, num_microbatches: int) -> torch.Tensor:
    """This rank's per-depth MTP losses (mean over micro-batches, unscaled); clears the tracker."""
    from dsv4cli.compat.versions import mtp_tracked_losses

    out = torch.zeros(depth, dtype=torch.float64)
    values = mtp_tracked_losses()
    if depth and values is not None:
        n = min(depth, values.numel())
        out[:n] = values.detach().double().cpu()[:n] / max(num_microbatches, 1)
        values.zero_()
    return out


class StepValues(NamedTuple):
    loss: float
    mtp_losses: list[float]
    stop: bool  # any rank wants to stop
    indexer_loss: Optional[float] = None  # None: not asked for, or no csa layer computed one


def reduce_step_values(rt: Runtime, losses: list[dict], num_microbatches: int, stop: bool = False,
                       indexer: Optional[tuple[float, int]] = None) -> StepValues:
    """Average main and MTP losses over the data-parallel ranks and bring them to every rank.

    Each last-stage rank with tp rank 0 contributes; one all-reduce also agrees on `stop` and, when
    `indexer` (this rank's `take_indexer_losses`: loss sum, csa layers) is given, averages the
    indexer loss over the csa layers of every stage and data-parallel replica (tp / cp rank 0).
    """
    from megatron.core import parallel_state as ps

    depth = rt.spec.model.mtp.depth
    slots = 2 if indexer is not None else 0
    vec = torch.zeros(3 + depth + slots, dtype=torch.float64)
    first = ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    contributes = bool(losses) and first
    mtp = take_mtp_losses(depth, num_microbatches)
    if contributes:
        vec[0] = 1.0
        vec[1] = sum(float(d["lm loss"]) for d in losses) / len(losses)
        vec[2 : 2 + depth] = mtp
    if indexer is not None and first:
        vec[2 + depth] = indexer[0]
        vec[3 + depth] = float(indexer[1])
    vec[-1] = 1.0 if stop else 0.0
    if dist.get_world_size() > 1:
        v = vec.to(current_device())
        dist.all_reduce(v)
        vec = v.cpu()
    n = max(vec[0].item(), 1.0)
    indexer_loss = None
    if indexer is not None and vec[3 + depth].item() > 0:
        indexer_loss = vec[2 + depth].item() / vec[3 + depth].item()
    return StepValues(vec[1].item() / n, [x / n for x in vec[2 : 2 + depth].tolist()], vec[-1].item() > 0,
                      indexer_loss)


def heldout_loss(rt: Runtime, valid, batches: int) -> tuple[float, list[float], int]:
    """Loss on the first `batches` global batches of the held-out source -> (loss, mtp, tokens)."""
    from dsv4cli.train.feeding import BatchFeeder

    t = rt.spec.train
    cfg = rt.config
    dropout = float(getattr(cfg, "hidden_dropout", 0.0) or 0.0) + float(getattr(cfg, "attention_dropout", 0.0) or 0.0)
    # MTP losses are only tracked in training mode; without dropout the two modes compute the same.
    for m in rt.model:
        m.train(dropout == 0.0)
    total, total_mtp = 0.0, None
    feeder = BatchFeeder(rt, valid)
    try:
        with torch.no_grad(), params_synced(rt):
            for b in range(batches):
                mbs = feeder.get(b * t.global_batch_size)
                losses = run_microbatches(rt, mbs, forward_only=True)
                loss, mtp = reduce_step_values(rt, losses, len(mbs))[:2]
                total += loss
                total_mtp = mtp if total_mtp is None else [a + c for a, c in zip(total_mtp, mtp)]
    finally:
        feeder.close()
    for m in rt.model:
        m.train()
    mtp_mean = [x / batches for x in (total_mtp or [])] if dropout == 0.0 else []
    return total / batches, mtp_mean, batches * t.global_batch_size * rt.spec.model.seq_length

