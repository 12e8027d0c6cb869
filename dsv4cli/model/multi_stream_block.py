"""TransformerBlock over n mHC streams: expand after the embedding, contract before the final norm.

    first stage:  e [s, b, h] -> n copies [s, b, n*h]
    every stage:  layers on [s, b, n*h]         (pipeline stages send [s, b, n*h])
    last stage:   y = contract(x) [s, b, h] -> final_layernorm(y)

With MTP the last stage returns the multi-stream state instead (MTP depth 1 consumes it) and the
GPT model applies `head()` itself. The contraction parameters `hc_head_*` are bare parameters of
this block (keys `decoder.hc_head_*`) and are added to `sharded_state_dict` explicitly.
Dsv4GPTModel (model/gpt.py) builds the block explicitly.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import WrappedTensor, make_viewless_tensor

from dsv4cli.model.contraction import (
    HC_HEAD_NAMES,
    add_contraction_params,
    contract,
    contraction_sharded_state_dict,
)
from dsv4cli.model.fp32_params import KeepFp32Params


def expand_streams(e: Tensor, n: int) -> Tensor:
    """[s, b, h] -> [s, b, n*h]: n identical copies, stream-major."""
    s, b, h = e.shape
    return e.unsqueeze(2).expand(s, b, n, h).reshape(s, b, n * h)


class MultiStreamTransformerBlock(KeepFp32Params, TransformerBlock):
    """megatron TransformerBlock on [s, b, n*h] with the output contraction before the final norm.

    n = config.mhc_streams and the contraction come from `config` (a Dsv4TransformerConfig).
    """

    def __init__(self, config, spec, post_layer_norm: bool = True, pre_process: bool = True,
                 post_process: bool = True, pg_collection=None, vp_stage=None):
        if getattr(config, "mhc_streams", 1) < 2:
            raise ValueError("MultiStreamTransformerBlock needs a Dsv4TransformerConfig with mhc_streams >= 2")
        super().__init__(config, spec, post_layer_norm=post_layer_norm, pre_process=pre_process,
                         post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage)
        self.streams = config.mhc_streams
        # With MTP the GPT model needs the un-contracted streams of the last layer.
        self.return_streams = config.mtp_num_layers is not None
        # PATCH (stays; dsv4cli/compat/megatron_patches.py `block_final_norm`): megatron's forward
        # applies `self.final_layernorm` to the last layer's output; ours must
        # contract first (head()). The norm stays registered as the child `final_layernorm` (its
        # checkpoint key) and is used through `head_norm`; the instance attribute below makes
        # `self.final_layernorm` read None, set once here instead of around every forward.
        # Checked against megatron-core 0.16.1 (TransformerBlock.forward reads the attribute only).
        self.__dict__["head_norm"] = self._modules.get("final_layernorm")
        self.__dict__["final_layernorm"] = None
        if self.head_norm is not None:
            add_contraction_params(self, config)

    def fp32_param_names(self) -> list[str]:
        return [n for n in HC_HEAD_NAMES if hasattr(self, n)]

    def has_final_layernorm_in_this_stage(self):
        """The contraction and final norm sit with the loss (post_process), also with MTP."""
        return bool(self.submodules.layer_norm and self.post_process and self.post_layer_norm)

    def head(self, x: Tensor) -> Tensor:
        """[s, b, n*h] -> final_layernorm(contract(x)) [s, b, h]."""
        y = self.head_norm(contract(self, x))
        return make_viewless_tensor(inp=y, requires_grad=True, keep_graph=True)

    @property
    def needs_token_ids(self) -> bool:
        """Some layer of this block routes by token id (DeepSeek-V4 hash routing)."""
        return any(getattr(layer, "needs_token_ids", False) for layer in self.layers)

    def forward(self, hidden_states, *args, token_ids: Optional[Tensor] = None, **kwargs):
        """[s, b, h] (first stage) or received [s, b, n*h] -> [s, b, n*h], or [s, b, h] after the head.

        token_ids [s, b]: for hash-routed layers. megatron's block calls (and, under full recompute,
        re-runs in backward) its layers with a fixed argument list whose one per-token slot a GPT
        model leaves empty is `context` (cross-attention); the ids travel there, so a recomputed
        layer sees exactly the ids of its own micro-batch. Layers return it unchanged."""
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        if self.pre_process and hidden_states is not None:
            hidden_states = expand_streams(hidden_states, self.streams)
        if token_ids is not None and self.needs_token_ids:
            if kwargs.get("context") is not None or len(args) > 1:
                raise ValueError("hash-routed layers carry the token ids in `context`: no cross-attention context")
            kwargs["context"] = token_ids
        x = super().forward(hidden_states, *args, **kwargs)  # no final norm: final_layernorm reads None
        if self.head_norm is not None and not self.return_streams:
            return self.head(x)
        return x

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict = None):
        """megatron's block state (layers + children) plus the bare hc_head_* parameters."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        sd.update(contraction_sharded_state_dict(self, prefix, metadata))
        return sd
