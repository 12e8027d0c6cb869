"""DeepSeek-V4's MoE routers as megatron-core routers: sqrt(softplus) top-k with a selection-only
expert bias, and hash routing by token id.

Both plug into megatron's `MoELayer` as `MoESubmodules(router=...)` (megatron calls
`router(config=..., pg_collection=...)`; pass `functools.partial(HashRouter, vocab_size=V)` for the
hash router) and answer megatron's router call:

    forward(hidden [s, b, h], padding_mask [s, b] | None) -> probs [s*b, E], routing_map [s*b, E] bool

    logits  = hidden @ W^T                                    [s*b, E]   (W: `weight` [E, h])
    scores  = sqrt(softplus(logits))
    chosen  = top-k of (scores + expert_bias)                 [s*b, k]   (TopK: bias moves the choice only)
            | tid2eid[token id]                               [s*b, k]   (Hash: a fixed table, no bias)
    weights = scores[chosen] / (sum of scores[chosen] + 1e-20) * routed scaling factor
    probs   = weights scattered to their experts, 0 elsewhere

megatron-core 0.16.1's own TopKRouter allows softmax/sigmoid scores only and an expert bias
only with sigmoid, hence these classes. The sizes come from megatron's config fields with the
same meaning: `num_moe_experts`, `moe_router_topk`, `moe_router_topk_scaling_factor` (the routed
scaling factor), `moe_router_dtype` (the dtype of the logits).

`expert_bias` ([E], fp32, saved in checkpoints) and `local_tokens_per_expert` ([E], not saved,
tokens routed to each expert while gradients are on) carry megatron's names; the no-aux-loss bias
update after each training step (megatron's `get_updated_expert_bias`, summed over every routing
rank) is `dsv4cli.model.dsv4.expert_bias.update_expert_bias`. Hash routers have no bias.

Token ids for hash routing. Megatron's MoELayer calls its router with the hidden states alone, so
the token ids reach a `HashRouter` in one of two ways:
- `router(hidden, token_ids=ids)`, ids [s, b] laid out like the hidden states' leading dims
  (megatron's [s, b], i.e. `input_ids.t()`);
- `with router.token_ids_scope(ids): ...` around a call that reaches the router without them —
  how `dsv4cli.model.dsv4.moe.Dsv4MoELayer` threads the ids it is given through megatron's
  MoELayer.forward. The scope is left at the end of that one call, so activation recompute
  (which calls the layer again with the same arguments) and pipeline schedules that interleave
  micro-batches never see another micro-batch's ids.
The layer holding a hash router must therefore be given the token ids: the first pipeline stage
has them; with sequence parallelism they would have to be split like the hidden states (tensor
parallelism is refused with DeepSeek-V4's blocks for now).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection, router_gating_linear
from megatron.core.transformer.moe.router import Router

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def sqrtsoftplus(logits: torch.Tensor) -> torch.Tensor:
    """[..., E] logits -> [..., E] scores sqrt(softplus(logits)) (positive, unbounded)."""
    return F.softplus(logits).sqrt()


def weights_of_chosen(scores: torch.Tensor, chosen: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [T, E], chosen experts [T, k] -> (probs [T, E]: the chosen scores normalised to sum
    to `scaling`, 0 elsewhere; routing_map [T, E] bool)."""
    weights = scores.gather(1, chosen)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * scaling
    probs = torch.zeros_like(scores).scatter(1, chosen, weights)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, chosen, True)
    return probs, routing_map


class _SqrtSoftplusRouter(Router):
    """What both routers share: the gate weight [E, h] (megatron's), the scores, the weighting."""

    def __init__(self, config, pg_collection=None, **megatron_kwargs):
        """megatron_kwargs: what newer megatron-core passes on (0.19: is_mtp_layer)."""
        super().__init__(config, pg_collection if pg_collection is not None else get_default_pg_collection(),
                         **megatron_kwargs)
        self.topk = config.moe_router_topk
        self.scaling = config.moe_router_topk_scaling_factor or 1.0

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., h] -> sqrt(softplus(logits)) [tokens, E], logits in `moe_router_dtype` (else hidden's)."""
        dtype = _ROUTER_DTYPES.get(self.config.moe_router_dtype, hidden.dtype)
        logits = router_gating_linear(hidden, self.weight, self.bias, dtype)
        return sqrtsoftplus(logits.reshape(-1, self.num_experts))

    def routing(self, logits: torch.Tensor):  # megatron's abstract hook; forward does the work
        raise NotImplementedError("DeepSeek-V4 routers route in forward(hidden)")


class SqrtSoftplusTopKRouter(_SqrtSoftplusRouter):
    """Top-k experts of sqrt(softplus) scores plus a no-aux-loss expert bias that moves the choice
    only (the weights come from the unbiased scores). Buffers: `expert_bias` [E] fp32 (saved),
    `local_tokens_per_expert` [E] (not saved)."""

    def __init__(self, config, pg_collection=None, **megatron_kwargs):
        super().__init__(config, pg_collection, **megatron_kwargs)
        self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        self.register_buffer("local_tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.float32),
                             persistent=False)

    def _keep_float32_bias(self):
        """Mixed-precision wrappers cast buffers with the module; the bias must stay fp32."""
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias.data = self.expert_bias.data.float()

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, token_ids=None):
        """input [s, b, h] -> probs [s*b, E], routing_map [s*b, E]; padding_mask [s, b] (True: padding)
        only keeps padded tokens out of the per-expert token count. `token_ids` are ignored."""
        self._keep_float32_bias()
        scores = self.scores(input)
        with torch.no_grad():
            chosen = torch.topk(scores + self.expert_bias, self.topk, dim=-1).indices
        probs, routing_map = weights_of_chosen(scores, chosen, self.scaling)
        if torch.is_grad_enabled():
            with torch.no_grad():
                counted = routing_map if padding_mask is None else routing_map & ~padding_mask.reshape(-1, 1)
                self.local_tokens_per_expert += counted.sum(dim=0)
        return probs, routing_map

    def _load_from_state_dict(self, *args, **kwargs):
        self._keep_float32_bias()
        return super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, *args, **kwargs):
        self._keep_float32_bias()
        return super()._save_to_state_dict(*args, **kwargs)


class HashRouter(_SqrtSoftplusRouter):
    """Experts chosen by a fixed token-id -> experts table, weighted by sqrt(softplus) scores.

    `tid2eid` [vocab_size, k] int64 is a buffer saved in checkpoints (not trained). A model trained
    from scratch starts from k distinct experts per token drawn with torch's default generator
    (like megatron's CPU weight init); an imported model loads the table it was trained with."""

    def __init__(self, config, pg_collection=None, *, vocab_size: int, **megatron_kwargs):
        super().__init__(config, pg_collection, **megatron_kwargs)
        table = torch.zeros(vocab_size, self.topk, dtype=torch.int64)
        if config.perform_initialization:
            table = torch.rand(vocab_size, self.num_experts).topk(self.topk, dim=-1).indices
        self.register_buffer("tid2eid", table)
        self._token_ids: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def token_ids_scope(self, token_ids: Optional[torch.Tensor]) -> Iterator[None]:
        """Route calls inside the block by `token_ids` [s, b] (see the module docstring)."""
        previous, self._token_ids = self._token_ids, token_ids
        try:
            yield
        finally:
            self._token_ids = previous

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                token_ids: Optional[torch.Tensor] = None):
        """input [s, b, h], token_ids [s, b] (or from `token_ids_scope`) -> probs [s*b, E], routing_map [s*b, E]."""
        ids = token_ids if token_ids is not None else self._token_ids
        if ids is None:
            raise RuntimeError("hash routing needs the token ids: pass token_ids= or call inside token_ids_scope(ids)")
        if tuple(ids.shape) != tuple(input.shape[:-1]):
            raise ValueError(f"token ids {tuple(ids.shape)} do not match the hidden states' leading dims "
                             f"{tuple(input.shape[:-1])} (megatron's layout is [s, b]: pass input_ids.t())")
        chosen = self.tid2eid[ids.reshape(-1)]
        return weights_of_chosen(self.scores(input), chosen, self.scaling)
