"""mHC for one sub-layer: n residual streams in, the sub-layer's input out, n streams back.

    x [s, b, n*h] ── mappings(x) ──> H_pre [s,b,n], H_post [s,b,n], H_res [s,b,n,n]
      │
      ├── aggregate:  u = Σ_i H_pre[i] x_i                      [s, b, h]  -> norm -> F (attn or MLP)
      └── post+res:   x'_k = H_post[k] F(u) + Σ_j H_res[j,k] x_j   [s, b, n*h]

Parameters (fp32 always, TP-replicated; docs/design.md §2.2): `mapping_proj.weight [n*n+2n, n*h]`
(xavier-uniform), `alpha_pre`, `alpha_post`, `alpha_res` ([1] each, = gating_init), `bias [n*n+2n]`
(zeros, ordered pre, post, res). Under sequence parallelism each rank sees a sequence shard, so
the params are tagged `sequence_parallel` and megatron all-reduces their grads over TP.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dsv4cli import kernels
from dsv4cli.model.fp32_params import KeepFp32Params


def param_device(config) -> Optional[torch.device]:
    """Where this config's dsv4 parameters go after initialisation: `config.param_device` (set by the
    builder), or None for torch's default device (CPU, or `meta` under inspection)."""
    where = getattr(config, "param_device", None)
    return torch.device(where) if where else None


def mark_replicated(param: torch.nn.Parameter, sequence_parallel: bool) -> torch.nn.Parameter:
    """Tag a TP-replicated parameter so megatron reduces its grad over TP under sequence parallelism."""
    param.sequence_parallel = bool(sequence_parallel)
    return param


class HyperConnection(KeepFp32Params, torch.nn.Module):
    """One sub-layer's mHC: mappings from x [.., n*h]; aggregate to [.., h]; merge back to [.., n*h]."""

    def __init__(self, config):
        """config: a Dsv4TransformerConfig (hidden_size h, mhc_* fields, sequence_parallel, param_device)."""
        super().__init__()
        n = config.mhc_streams
        self.n = n
        self.config = config
        width = n * n + 2 * n
        gating = config.mhc_gating_init
        self.mapping_proj = torch.nn.Linear(n * config.hidden_size, width, bias=False, dtype=torch.float32)
        self.alpha_pre = torch.nn.Parameter(torch.full((1,), gating, dtype=torch.float32))
        self.alpha_post = torch.nn.Parameter(torch.full((1,), gating, dtype=torch.float32))
        self.alpha_res = torch.nn.Parameter(torch.full((1,), gating, dtype=torch.float32))
        self.bias = torch.nn.Parameter(torch.zeros(width, dtype=torch.float32))
        # Initialised on the default device (the CPU generator, identical on every TP rank), then moved.
        self.reset_parameters()
        device = param_device(config)
        if device is not None:
            self.to(device)
        for p in self.parameters():
            mark_replicated(p, config.sequence_parallel)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            torch.nn.init.xavier_uniform_(self.mapping_proj.weight)
            for a in (self.alpha_pre, self.alpha_post, self.alpha_res):
                a.fill_(self.config.mhc_gating_init)
            self.bias.zero_()

    def alpha(self) -> Tensor:
        """[3] gating scales (pre, post, res) as the ops take them."""
        return torch.cat([self.alpha_pre, self.alpha_post, self.alpha_res])

    def _pre(self, x: Tensor) -> tuple[Tensor, Tensor, object]:
        c = self.config
        return kernels.mhc_pre_mix(
            x, self.mapping_proj.weight, self.alpha(), self.bias, self.n, c.mhc_sinkhorn_iterations, c.mhc_eps
        )

    def pre(self, x: Tensor) -> tuple[Tensor, Tensor, object]:
        """x [s, b, n*h] -> (u [s, b, h], H_post [s,b,n], mix): the mappings (fp32) and the aggregate
        u = Σ_i H_pre[i] x_i as one op (H_pre stays inside); `mix` is what kernels.mhc_post needs for the
        residual Σ_j H_res[j,k] x_j (the kernels pick the path: kernels.mhc_pre_mix).

        With `recompute`, only x is kept for backward and the mappings (Sinkhorn included) and u are
        recomputed there.
        """
        if self.config.mhc_recompute and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._pre, x, use_reentrant=False)
        return self._pre(x)

    def forward(self, x: Tensor, sublayer) -> Tensor:
        """x [s, b, n*h] -> [s, b, n*h], with `sublayer: [s, b, h] -> [s, b, h]` (norm + attn or MLP):
        x'_k = H_post[k] f + Σ_j H_res[j,k] x_j, f = sublayer(u)."""
        u, h_post, mix = self.pre(x)
        return kernels.mhc_post(mix, sublayer(u), h_post, self.n, x.dtype)
