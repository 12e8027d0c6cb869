"""Output contraction of n streams to one before the final norm: learned (DSv4) or legacy average.

Mode, eps and the stream count come from the owner's `config` (a Dsv4TransformerConfig). The
learned parameters are bare parameters of their owner (the decoder block, or one MTP depth),
so that checkpoint keys read `decoder.hc_head_fn` and `mtp.layers.{k}.hc_head_fn` (docs/design.md §2.5).
Owners must put them into their `sharded_state_dict` themselves (`contraction_sharded_state_dict`):
megatron's TransformerBlock only walks child modules and would silently drop them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsv4cli import kernels
from dsv4cli.ckpt.keys import HC_HEAD_NAMES
from dsv4cli.model.hyper_connection import mark_replicated, param_device


def add_contraction_params(owner: torch.nn.Module, config) -> None:
    """Register hc_head_fn [n, n*h] (xavier), hc_head_base [n] (0), hc_head_scale [1] (1) on `owner`
    (learned mode with n > 1 only; config: a Dsv4TransformerConfig, n = mhc_streams, h = hidden_size).

    fp32, initialised on the default device and then moved to `config.param_device` when set."""
    if config.contraction_mode != "learned" or config.mhc_streams == 1:
        return
    n = config.mhc_streams
    fn = torch.empty(n, n * config.hidden_size, dtype=torch.float32)
    with torch.no_grad():
        torch.nn.init.xavier_uniform_(fn)
    values = {"hc_head_fn": fn, "hc_head_base": torch.zeros(n, dtype=torch.float32),
              "hc_head_scale": torch.ones(1, dtype=torch.float32)}
    device = param_device(config)
    for name in HC_HEAD_NAMES:
        value = values[name] if device is None else values[name].to(device)
        setattr(owner, name, mark_replicated(torch.nn.Parameter(value), config.sequence_parallel))


def contract(owner: torch.nn.Module, x: Tensor) -> Tensor:
    """x [s, b, n*h] -> [s, b, h] with the contraction of `owner.config` (and the owner's hc_head_*)."""
    c = owner.config
    if c.contraction_mode == "average":
        return kernels.average_output_contract(x, c.mhc_streams)
    return kernels.learned_output_contract(
        x, owner.hc_head_fn, owner.hc_head_base, owner.hc_head_scale, c.mhc_streams, c.contraction_eps
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
