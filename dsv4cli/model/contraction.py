"""Output contraction of n streams to one before the final norm: learned (DSv4) or legacy average.

The learned parameters are bare parameters of their owner (the decoder block, or one MTP depth),
so that checkpoint keys read `decoder.hc_head_fn` and `mtp.layers.{k}.hc_head_fn` (docs/design.md §2.5).
Owners must put them into their `sharded_state_dict` themselves (`contraction_sharded_state_dict`):
megatron's TransformerBlock only walks child modules and would silently drop them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from dsv4cli import kernels
from dsv4cli.ckpt.keys import HC_HEAD_NAMES
from dsv4cli.model.hyper_connection import mark_replicated


@dataclass(frozen=True)
class ContractionSettings:
    """model.contraction plus the stream count."""

    streams: int
    mode: str = "learned"
    eps: float = 1e-6


def add_contraction_params(owner: torch.nn.Module, hidden_size: int, settings: ContractionSettings,
                           sequence_parallel: bool, device: Optional[torch.device] = None) -> None:
    """Register hc_head_fn [n, n*h] (xavier), hc_head_base [n] (0), hc_head_scale [1] (1) on `owner` (learned only).

    fp32, initialised on the default device and then moved to `device` when given."""
    owner.contraction = settings
    if settings.mode != "learned" or settings.streams == 1:
        return
    n = settings.streams
    fn = torch.empty(n, n * hidden_size, dtype=torch.float32)
    with torch.no_grad():
        torch.nn.init.xavier_uniform_(fn)
    values = {"hc_head_fn": fn, "hc_head_base": torch.zeros(n, dtype=torch.float32),
              "hc_head_scale": torch.ones(1, dtype=torch.float32)}
    for name in HC_HEAD_NAMES:
        value = values[name] if device is None else values[name].to(device)
        setattr(owner, name, mark_replicated(torch.nn.Parameter(value), sequence_parallel))


def contract(owner: torch.nn.Module, x: Tensor) -> Tensor:
    """x [s, b, n*h] -> [s, b, h] with the owner's contraction."""
    s: ContractionSettings = owner.contraction
    if s.mode == "average":
        return kernels.average_output_contract(x, s.streams)
    return kernels.learned_output_contract(
        x, owner.hc_head_fn, owner.hc_head_base, owner.hc_head_scale, s.streams, s.eps
    )


def contraction_sharded_state_dict(owner: torch.nn.Module, prefix: str, metadata: dict | None) -> dict:
    """ShardedTensors (TP/DP-replicated) for the owner's hc_head_* parameters, keyed `{prefix}hc_head_*`."""
    from megatron.core.transformer.utils import (
        ensure_metadata_has_dp_cp_group,
        make_sharded_tensors_for_checkpoint,
    )

    params = {name: getattr(owner, name) for name in HC_HEAD_NAMES if hasattr(owner, name)}
    if not params:
        return {}
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    tp_group = getattr(owner, "tp_group", None)
    if tp_group is None:
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
    return make_sharded_tensors_for_checkpoint(
        params, prefix, {}, (), tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"]
    )
