"""DeepSeek-V4's MoE block as megatron-core's MoELayer: a DeepSeek-V4 router, clamped-SwiGLU routed
experts and shared experts, with the token ids that hash routing needs.

    hidden [s, b, h] --router--> probs, routing_map [s*b, E] --dispatch--> routed experts (SwiGLU, clamp)
          |                                                                  | combine (weighted sum)
          +----------------------> shared experts (SwiGLU, clamp) ----------(+)--> out [s, b, h]

`dsv4_moe_spec` turns megatron's MoE ModuleSpec (any backend's experts and shared experts) into
this block; the clamp itself is a TransformerConfig setting (`experts.clamped_swiglu_config`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import replace
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from dsv4cli.compat.versions import moe_spec_submodules, moe_spec_with
from dsv4cli.model.dsv4.experts import check_clamped_swiglu
from dsv4cli.model.dsv4.router import HashRouter, SqrtSoftplusTopKRouter


class Dsv4MoELayer(MoELayer):
    """megatron's MoELayer whose forward also takes `token_ids` [s, b] for a hash router (ignored
    by the top-k router); the router sees them for exactly this call (router.py says why)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **megatron_kwargs):
        """megatron_kwargs: what newer megatron-core passes on (0.19: is_mtp_layer, name)."""
        check_clamped_swiglu(config)
        super().__init__(config, submodules, layer_number, pg_collection, **megatron_kwargs)
        if self.moe_layer_recompute and isinstance(self.router, HashRouter):
            # megatron re-runs its inner forward in backward, outside the call that carried the ids
            raise ValueError("selective 'moe' recompute is not supported on hash-routed layers")

    @property
    def needs_token_ids(self) -> bool:
        """True when the router is a hash router (the layer must be given `token_ids`)."""
        return isinstance(self.router, HashRouter)

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None,
                padding_mask: Optional[torch.Tensor] = None, token_ids: Optional[torch.Tensor] = None):
        """hidden_states [s, b, h], token_ids [s, b] -> (output [s, b, h], None). Under sequence
        parallelism hidden_states is this TP rank's [s / T, b, h] slice and so become the ids."""
        if token_ids is not None and token_ids.shape[0] != hidden_states.shape[0] and self.config.sequence_parallel:
            group = self.tp_group
            token_ids = token_ids.chunk(group.size(), dim=0)[group.rank()]
        scope = self.router.token_ids_scope(token_ids) if isinstance(self.router, HashRouter) else contextlib.nullcontext()
        with scope:
            return super().forward(hidden_states, intermediate_tensors, padding_mask)


class _KnownMlpNotice(logging.Filter):
    """Drops megatron's "Unknown MLP type" notice: TransformerLayer logs it for every MLP class not in
    its own list (here Dsv4MoELayer, which then takes megatron's default process groups itself, as
    megatron's MoELayer does when given none). Installed by `dsv4_moe_spec`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


def dsv4_moe_spec(moe_spec: ModuleSpec, *, hash_routed: bool, vocab_size: int) -> ModuleSpec:
    """megatron's MoE ModuleSpec -> the same experts under Dsv4MoELayer with a hash router
    (a [vocab_size, k] table) or the sqrt(softplus) top-k router."""
    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _KnownMlpNotice) for f in layer_logger.filters):
        layer_logger.addFilter(_KnownMlpNotice())
    router = functools.partial(HashRouter, vocab_size=vocab_size) if hash_routed else SqrtSoftplusTopKRouter
    submodules = replace(moe_spec_submodules(moe_spec), router=router)
    return moe_spec_with(moe_spec, Dsv4MoELayer, submodules)
