"""Feeding micro-batches to the ranks that need them, as Megatron-LM's `get_batch` does.

- Only the first and the last pipeline stage read batches (the first embeds the tokens, the last
  computes the loss and the MTP depths, which embed the tokens again); the stages in between get
  placeholders (`None` fields) and take their input from the previous stage.
- Within a tensor-parallel group only TP rank 0 reads the data source; the others receive the
  same micro-batches by one broadcast of the token ids + labels and one of the loss masks.
- On CUDA the host batches are built in pinned memory and copied without blocking, and the next
  step's batches are built in a background thread while this step runs (`BatchFeeder`); on CPU
  they are built when asked, in this thread.

Every batch is `{"tokens", "labels", "loss_mask", "position_ids"}`: tensors [b, s] (int64, loss
mask float32) on the device the model runs on, or None on stages that take no batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from dsv4cli.compat.device import cuda_available, current_device
from dsv4cli.train.data import microbatches

_EMPTY = {"tokens": None, "labels": None, "loss_mask": None, "position_ids": None}


@dataclass(frozen=True)
class FeedPlan:
    """Who reads what: decided once per run from megatron's parallel state."""

    needs: bool  # this pipeline stage takes batches (first or last stage)
    reads: bool  # this rank reads the data source (TP rank 0 of a stage that needs batches)
    tp_group: object
    tp_src: int  # global rank of TP rank 0 (the broadcast source)
    tp_size: int
    dp_rank: int
    dp: int
    device: Optional[torch.device]  # CUDA device, None on CPU
    pin: bool
    prefetch: bool


def feed_plan(rt) -> FeedPlan:
    """FeedPlan of this rank for runtime `rt` (pinning and prefetch from rt.settings: GPU only)."""
    from megatron.core import parallel_state as ps

    needs = ps.is_pipeline_first_stage(ignore_virtual=True) or ps.is_pipeline_last_stage(ignore_virtual=True)
    tp_size = ps.get_tensor_model_parallel_world_size()
    cuda = cuda_available()
    settings = rt.settings
    return FeedPlan(
        needs=needs,
        reads=needs and ps.get_tensor_model_parallel_rank() == 0,
        tp_group=ps.get_tensor_model_parallel_group() if tp_size > 1 else None,
        tp_src=ps.get_tensor_model_parallel_src_rank(),
        tp_size=tp_size,
        dp_rank=ps.get_data_parallel_rank(),
        dp=rt.dims.dp,
        device=current_device() if cuda else None,
        pin=bool(settings and settings.pin_memory and cuda),
        prefetch=bool(settings and settings.prefetch and cuda),
    )


def host_batches(plan: FeedPlan, source, position: int, global_batch: int, micro_batch: int
                 ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Read this DP rank's micro-batches from the source -> (ids [M, 2, b, s] int64 = tokens, labels;
    loss_mask [M, b, s] float32) in host memory (pinned with plan.pin); None where this rank reads nothing."""
    if not plan.reads:
        return None
    mbs = microbatches(source, position, global_batch, micro_batch, plan.dp_rank, plan.dp)
    ids = torch.from_numpy(np.stack([np.stack([m["tokens"], m["labels"]]) for m in mbs]).astype(np.int64, copy=False))
    mask = torch.from_numpy(np.stack([m["loss_mask"] for m in mbs]).astype(np.float32, copy=False))
    if plan.pin:
        ids, mask = ids.pin_memory(), mask.pin_memory()
    return ids, mask


def deliver(plan: FeedPlan, host, num_micro: int, micro_batch: int, seq: int) -> list[dict]:
    """Host batches (TP rank 0) -> this rank's micro-batch dicts on the model's device (TP broadcast)."""
    if not plan.needs:
        return [dict(_EMPTY) for _ in range(num_micro)]
    if host is None:  # a TP rank > 0: receive
        ids = torch.empty(num_micro, 2, micro_batch, seq, dtype=torch.int64, device=plan.device)
        mask = torch.empty(num_micro, micro_batch, seq, dtype=torch.float32, device=plan.device)
    else:
        ids, mask = host
        if plan.device is not None:
            ids, mask = ids.to(plan.device, non_blocking=True), mask.to(plan.device, non_blocking=True)
    if plan.tp_size > 1:
        dist.broadcast(ids, plan.tp_src, group=plan.tp_group)
        dist.broadcast(mask, plan.tp_src, group=plan.tp_group)
    positions = torch.arange(seq, device=plan.device).expand(micro_batch, seq)
    return [{"tokens": ids[m, 0], "labels": ids[m, 1], "loss_mask": mask[m], "position_ids": positions}
            for m in range(num_micro)]


class BatchFeeder:
    """This rank's micro-batches of consecutive global batches; on CUDA the next one is read ahead.

    `get(position)` -> list of micro-batch dicts for the global batch starting at sample `position`.
    The read-ahead guesses position + global_batch (the training loop's next step); any other
    position is read directly.
    """

    def __init__(self, rt, source, global_batch: Optional[int] = None):
        t = rt.spec.train
        self.plan = feed_plan(rt)
        self.source = source
        self.global_batch = global_batch or t.global_batch_size
        self.micro = t.micro_batch_size
        self.seq = rt.spec.model.seq_length
        self.num_micro = self.global_batch // self.plan.dp // self.micro
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dsv4-prefetch") if self.plan.prefetch else None
        self._ahead: Optional[tuple[int, object]] = None

    def _read(self, position: int):
        return host_batches(self.plan, self.source, position, self.global_batch, self.micro)

    def get(self, position: int) -> list[dict]:
        host = None
        if self._ahead is not None:  # wait for it either way: the source is read by one thread at a time
            ahead_position, future = self._ahead
            self._ahead = None
            host = future.result() if ahead_position == position else None
        if host is None and self.plan.reads:
            host = self._read(position)
        if self._pool is not None and self.plan.reads:
            nxt = position + self.global_batch
            self._ahead = (nxt, self._pool.submit(self._read, nxt))
        return deliver(self.plan, host, self.num_micro, self.micro, self.seq)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
