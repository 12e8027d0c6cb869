"""Dsv4TransformerConfig: megatron's TransformerConfig plus the DSv4 model settings (one carrier).

Every dsv4 module reads its settings from the `config` megatron hands it, so the stream count and
the mHC / contraction constants have one source: `dsv4cli.build.config.transformer_config(spec)`.
MTP uses megatron's own fields (`mtp_num_layers`, `mtp_loss_scaling_factor`).

New model features add their fields here (with a default that leaves the model unchanged) and set
them in `transformer_config`; `hidden_size` stays h (the width of one stream). Settings that differ
per layer (DeepSeek-V4 attention's kind, ratio and sizes; hash vs top-k router) travel in that
layer's ModuleSpec instead (dsv4cli/build/dsv4_specs.py); the SwiGLU clamp and the router sizes are
megatron's own fields (`activation_func_clamp_value`, `moe_router_topk`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class Dsv4TransformerConfig(TransformerConfig):
    """TransformerConfig + model.mhc, model.contraction and where dsv4's own parameters live."""

    # model.mhc: n residual streams (1 = plain residuals, megatron's own modules)
    mhc_streams: int = 1
    mhc_sinkhorn_iterations: int = 20
    mhc_gating_init: float = 0.01
    mhc_eps: float = 1e-6
    mhc_recompute: bool = False  # train.recompute "mhc": mappings recomputed in backward

    # model.contraction: n streams -> 1 before the final norms ("learned" | "average")
    contraction_mode: str = "learned"
    contraction_eps: float = 1e-6

    # Where mHC/contraction parameters and the local norms are placed after their initialisation
    # on torch's default device: None = stay there (CPU, or `meta` under inspection); "cuda" = the
    # current CUDA device. The builder decides (dsv4cli.build.config); model code never asks torch.
    param_device: Optional[str] = None

    @property
    def stream_width(self) -> int:
        """n*h: the width of the multi-stream residual state [s, b, n*h]."""
        return self.mhc_streams * self.hidden_size
