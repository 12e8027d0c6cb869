"""A megatron TransformerLayer whose residual is n mHC streams: [s, b, n*h] -> [s, b, n*h].

Same submodules as megatron's layer (input_layernorm, self_attention, pre_mlp_layernorm, mlp);
the plain residual adds are replaced by one HyperConnection per sub-layer (docs/design.md §2.2):

    x ─ self_attention_hyper_connection(x, u -> attn(input_layernorm(u))) ─> x
      ─ mlp_hyper_connection(x, u -> mlp(pre_mlp_layernorm(u)))          ─> x

A hash-routed MoE (DeepSeek-V4, `mlp.needs_token_ids`) is called with the token ids [s, b]: given
as `token_ids=` or, from the block, as `context` (megatron's block calls its layers, and re-runs
them under full recompute, with a fixed argument list; multi_stream_block.py says why `context`).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from dsv4cli.model.hyper_connection import HyperConnection


class MultiStreamTransformerLayer(TransformerLayer):
    """TransformerLayer with mHC residual streams; the mHC settings come from `config` (mhc_*)."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None, pg_collection=None,
                 vp_stage=None):
        if getattr(config, "mhc_streams", 1) < 2:
            raise ValueError("MultiStreamTransformerLayer needs a Dsv4TransformerConfig with mhc_streams >= 2")
        super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout,
                         pg_collection=pg_collection, vp_stage=vp_stage)
        self.streams = config.mhc_streams
        self.self_attention_hyper_connection = HyperConnection(config)
        self.mlp_hyper_connection = HyperConnection(config)

    @property
    def needs_token_ids(self) -> bool:
        """The MLP routes by token id (a DeepSeek-V4 hash-routed MoE layer)."""
        return bool(getattr(self.mlp, "needs_token_ids", False))

    def _norm(self, norm, u: Tensor, recompute: bool):
        """norm(u) [s, b, h]; with `recompute` (train.recompute "layernorm") the output is released
        after its consumer ran and recomputed in backward (megatron's CheckpointWithoutOutput).
        Returns (normed, checkpoint or None)."""
        if not recompute:
            return norm(u), None
        ckpt = tensor_parallel.CheckpointWithoutOutput(fp8=self.config.fp8)
        return ckpt.checkpoint(norm, u), ckpt

    def _sublayer_output(self, output_with_bias) -> Tensor:
        """(out, bias) of attention/MLP -> f [s, b, h] (bias added, hidden dropout applied)."""
        out, bias = output_with_bias
        if bias is not None:
            out = out + bias
        if self.training and self.hidden_dropout > 0:
            out = torch.nn.functional.dropout(out, p=self.hidden_dropout, training=True)
        return out

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
        rotary_pos_cos: Optional[Tensor] = None,
        rotary_pos_sin: Optional[Tensor] = None,
        rotary_pos_cos_sin: Optional[Tensor] = None,
        attention_bias: Optional[Tensor] = None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
        *,
        inference_params=None,
        token_ids: Optional[Tensor] = None,
        **kwargs,
    ):
        """hidden_states [s, b, n*h] -> ([s, b, n*h], context); token_ids [s, b] for a hash-routed MLP."""
        inference_context = inference_context if inference_context is not None else inference_params
        mlp_kwargs = {"padding_mask": padding_mask}
        if self.needs_token_ids:
            mlp_kwargs["token_ids"] = token_ids if token_ids is not None else context

        def attention(u: Tensor) -> Tensor:
            normed, ckpt = self._norm(self.input_layernorm, u, self.recompute_input_layernorm)
            out = self.self_attention(
                normed,
                attention_mask=attention_mask,
                inference_context=inference_context,
                rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos,
                rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset,
            )
            if ckpt is not None:
                ckpt.discard_output_and_register_recompute(out[0])
            return self._sublayer_output(out)

        def mlp(u: Tensor) -> Tensor:
            normed, ckpt = self._norm(self.pre_mlp_layernorm, u, self.recompute_pre_mlp_layernorm)
            if self.recompute_mlp:
                out = tensor_parallel.checkpoint(functools.partial(self.mlp, **mlp_kwargs), False, normed)
            else:
                out = self.mlp(normed, **mlp_kwargs)
            if ckpt is not None:
                ckpt.discard_output_and_register_recompute(out[0])
            return self._sublayer_output(out)

        x = self.self_attention_hyper_connection(hidden_states, attention)
        x = self.mlp_hyper_connection(x, mlp)
        return make_viewless_tensor(inp=x, requires_grad=x.requires_grad, keep_graph=True), context
