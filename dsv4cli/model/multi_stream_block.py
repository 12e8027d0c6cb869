"""TransformerBlock over n mHC streams: expand after the embedding, contract before the final norm.

    first stage:  e [s, b, h] -> n copies [s, b, n*h]
    every stage:  layers on [s, b, n*h]         (pipeline stages send [s, b, n*h])
    last stage:   y = contract(x) [s, b, h] -> final_layernorm(y)

With MTP the last stage returns the multi-stream state instead (MTP depth 1 consumes it) and the
GPT model applies `head()` itself. The contraction parameters `hc_head_*` are bare parameters of
this block (keys `decoder.hc_head_*`) and are added to `sharded_state_dict` explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.utils import WrappedTensor, make_viewless_tensor

from dsv4cli.model.contraction import (
    HC_HEAD_NAMES,
    ContractionSettings,
    add_contraction_params,
    contract,
    contraction_sharded_state_dict,
)
from dsv4cli.model.fp32_params import KeepFp32Params
from dsv4cli.model.hyper_connection import param_device
from dsv4cli.model.init_seed import DECODER_HEAD_UNIT, reseed


@dataclass
class MultiStreamBlockSubmodules(TransformerBlockSubmodules):
    """Block submodules plus the contraction settings (streams, mode, eps)."""

    contraction: Optional[ContractionSettings] = None


def expand_streams(e: Tensor, n: int) -> Tensor:
    """[s, b, h] -> [s, b, n*h]: n identical copies, stream-major."""
    s, b, h = e.shape
    return e.unsqueeze(2).expand(s, b, n, h).reshape(s, b, n * h)


class MultiStreamTransformerBlock(KeepFp32Params, TransformerBlock):
    """megatron TransformerBlock on [s, b, n*h] with the output contraction before the final norm."""

    def __init__(self, config, spec: MultiStreamBlockSubmodules, post_layer_norm: bool = True,
                 pre_process: bool = True, post_process: bool = True, pg_collection=None, vp_stage=None):
        if not isinstance(spec, MultiStreamBlockSubmodules) or spec.contraction is None:
            raise TypeError("MultiStreamTransformerBlock needs MultiStreamBlockSubmodules with contraction settings")
        super().__init__(config, spec, post_layer_norm=post_layer_norm, pre_process=pre_process,
                         post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage)
        self.streams = spec.contraction.streams
        # With MTP the GPT model needs the un-contracted streams of the last layer.
        self.return_streams = config.mtp_num_layers is not None
        if self.final_layernorm is not None:
            reseed(DECODER_HEAD_UNIT)  # same hc_head_* whichever layers this stage built before
            add_contraction_params(self, config.hidden_size, spec.contraction, config.sequence_parallel,
                                   device=param_device(config))
        else:
            self.contraction = spec.contraction

    def fp32_param_names(self) -> list[str]:
        return [n for n in HC_HEAD_NAMES if hasattr(self, n)]

    def has_final_layernorm_in_this_stage(self):
        """The contraction and final norm sit with the loss (post_process), also with MTP."""
        return bool(self.submodules.layer_norm and self.post_process and self.post_layer_norm)

    def head(self, x: Tensor) -> Tensor:
        """[s, b, n*h] -> final_layernorm(contract(x)) [s, b, h]."""
        y = self.final_layernorm(contract(self, x))
        return make_viewless_tensor(inp=y, requires_grad=True, keep_graph=True)

    def forward(self, hidden_states, *args, **kwargs):
        """[s, b, h] (first stage) or received [s, b, n*h] -> [s, b, n*h], or [s, b, h] after the head."""
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        if self.pre_process and hidden_states is not None:
            hidden_states = expand_streams(hidden_states, self.streams)
        final_norm = self.final_layernorm
        self.final_layernorm = None  # megatron applies it inside forward; we contract first
        try:
            x = super().forward(hidden_states, *args, **kwargs)
        finally:
            self.final_layernorm = final_norm
        if final_norm is not None and not self.return_streams:
            return self.head(x)
        return x

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict = None):
        """megatron's block state (layers + children) plus the bare hc_head_* parameters."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        sd.update(contraction_sharded_state_dict(self, prefix, metadata))
        return sd
