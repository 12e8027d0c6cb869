"""One MTP depth with mHC (docs/design.md §2.4): [s, b, n*h] streams in, [s, b, n*h] streams out.

    e = e_proj(enorm(embed(tokens shifted by k)))           [s, b, h]
    z = e (broadcast over streams) + h_proj(hnorm(x_i))      [s, b, n*h]   (hnorm per stream)
    x' = transformer_layer(z)                                [s, b, n*h]   (its own mHC layer)
    head(x') = final_layernorm(contract(x'))                 [s, b, h]     -> shared output layer

The streams x' go on to depth k+1. Parameters: enorm, hnorm, e_proj [h, h], h_proj [h, h] (no bias,
column-parallel like megatron's eh_proj), transformer_layer, final_layernorm, hc_head_* (learned).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_token_prediction import get_mtp_layer_offset, roll_tensor
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import make_viewless_tensor

from dsv4cli import kernels
from dsv4cli.compat.versions import MtpInnerLayerAlias, mtp_inner_layer_spec, mtp_layer_outputs
from dsv4cli.model.contraction import (
    HC_HEAD_NAMES,
    add_contraction_params,
    contract,
    contraction_sharded_state_dict,
)
from dsv4cli.model.fp32_params import KeepFp32Params


class StreamRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by `kernels.rms_norm` (same values; on CPU a hand-written backward that
    makes 6 passes over x instead of torch's ~12): MTP's `hnorm` runs on n times the tokens."""

    def forward(self, x: Tensor) -> Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return kernels.rms_norm(x, self.weight, eps)


def stream_norm(norm: torch.nn.Module) -> torch.nn.Module:
    """A torch RMSNorm with a weight as a StreamRMSNorm sharing that weight (same parameter object, same
    checkpoint key `weight`); any other norm (LayerNorm, TE's) unchanged."""
    if type(norm) is not torch.nn.RMSNorm or norm.weight is None:
        return norm
    fast = StreamRMSNorm(norm.normalized_shape, eps=norm.eps, device="meta")
    fast.weight = norm.weight
    return fast


class MultiStreamMTPLayer(KeepFp32Params, MtpInnerLayerAlias, MegatronModule):
    """MTP depth on n mHC streams (n = config.mhc_streams; contraction from `config`).

    Built by megatron's MultiTokenPredictionBlock like its own MultiTokenPredictionLayer (same
    constructor and forward signatures on megatron-core 0.16-0.19: dsv4cli/compat/versions.py), but
    not a subclass of it: that __init__ would build eh_proj [h, 2h] and draw its weights before the
    transformer layer (other parameters, another init), and its private `_get_embeddings` changes
    between megatron versions. The token/position shift uses megatron's public `roll_tensor`
    (context parallel aware) instead.
    """

    def __init__(self, config, submodules, layer_number: int = 1, vp_stage=None, pg_collection=None,
                 mtp_layer_pattern=None, name=None):
        super().__init__(config=config)
        if getattr(config, "mhc_streams", 1) < 2:
            raise ValueError("MultiStreamMTPLayer needs a Dsv4TransformerConfig with mhc_streams >= 2")
        self.sequence_parallel = config.sequence_parallel
        self.submodules = submodules
        self.layer_number = layer_number + get_mtp_layer_offset(config, vp_stage)
        self.vp_stage = vp_stage
        self.cp_group = pg_collection.cp
        self.streams = config.mhc_streams
        self.mtp_layer_pattern = mtp_layer_pattern  # megatron-core >= 0.17 passes it (None: a GPT layer)
        h = config.hidden_size
        norm_kwargs = dict(config=config, hidden_size=h, eps=config.layernorm_epsilon)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        proj_kwargs = dict(config=config, init_method=config.init_method, gather_output=False, bias=False,
                           skip_bias_add=False, is_expert=False, tp_group=self.tp_group)
        self.enorm = build_module(submodules.enorm, **norm_kwargs)
        self.hnorm = stream_norm(build_module(submodules.hnorm, **norm_kwargs))
        self.e_proj = build_module(submodules.eh_proj, h, h, **proj_kwargs)
        self.h_proj = build_module(submodules.eh_proj, h, h, **proj_kwargs)
        decoder_offset = config.num_layers - get_transformer_layer_offset(config, vp_stage)
        self.transformer_layer = build_module(
            mtp_inner_layer_spec(submodules), config=config, vp_stage=vp_stage,
            layer_number=self.layer_number + decoder_offset,
        )
        self.final_layernorm = build_module(submodules.layer_norm, **norm_kwargs)
        add_contraction_params(self, config)
        self.offload_context = nullcontext()

    def fp32_param_names(self) -> list[str]:
        return [n for n in HC_HEAD_NAMES if hasattr(self, n)]

    def _project(self, proj, x: Tensor) -> Tensor:
        """Column-parallel [s', b', h] -> full [s, b', h] (gathered over TP; SP input is gathered by proj)."""
        y, _ = proj(x)
        return gather_from_tensor_model_parallel_region(y, group=self.tp_group)

    def combine(self, streams: Tensor, decoder_input: Tensor) -> Tensor:
        """streams [s', b, n*h], embedding [s', b, h] -> z [s', b, n*h] (s' = s / tp under SP)."""
        n = self.streams
        s_loc, b, width = streams.shape
        h = width // n
        e = self._project(self.e_proj, self.enorm(decoder_input))  # [s, b, h]
        hs = self.hnorm(streams.reshape(s_loc, b, n, h)).reshape(s_loc, b * n, h)
        hs = self._project(self.h_proj, hs)  # [s, b*n, h]
        s = hs.shape[0]
        z = (hs.reshape(s, b, n, h) + e.unsqueeze(2)).reshape(s, b, n * h)
        if self.sequence_parallel:
            z = scatter_to_sequence_parallel_region(z, group=self.tp_group)
        return z

    def head(self, x: Tensor) -> Tensor:
        """[s, b, n*h] -> final_layernorm(contract(x)) [s, b, h]."""
        y = self.final_layernorm(contract(self, x))
        return make_viewless_tensor(inp=y, requires_grad=True, keep_graph=True)

    def _shifted_embeddings(self, input_ids, position_ids, embedding, packed_seq_params=None):
        """Tokens and positions shifted left by one (per depth) -> (input_ids, position_ids, e [s, b, h])."""
        input_ids, _ = roll_tensor(input_ids, shifts=-1, dims=-1, cp_group=self.cp_group,
                                   packed_seq_params=packed_seq_params)
        position_ids, _ = roll_tensor(position_ids, shifts=-1, dims=-1, cp_group=self.cp_group,
                                      packed_seq_params=packed_seq_params)
        return input_ids, position_ids, embedding(input_ids=input_ids, position_ids=position_ids)

    def _combine_and_layer(self, hidden_states, decoder_input, attention_mask=None, rotary_pos_emb=None,
                           rotary_pos_cos=None, rotary_pos_sin=None, attention_bias=None,
                           inference_params=None, packed_seq_params=None, sequence_len_offset=None):
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.sequence_parallel else nullcontext()
        with rng:
            z = self.combine(hidden_states, decoder_input)
            x, _ = self.transformer_layer(
                hidden_states=z, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin, attention_bias=attention_bias,
                inference_params=inference_params, packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset,
            )
        return x

    def forward(self, input_ids, position_ids, hidden_states, attention_mask, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, attention_bias=None,
                inference_params=None, packed_seq_params=None, sequence_len_offset=None, embedding=None,
                padding_mask=None):
        """streams [s, b, n*h] of depth k-1 -> (streams of depth k, rolled input_ids, rolled position_ids)."""
        if context is not None:
            raise NotImplementedError("MTP with cross attention is not supported")
        input_ids, position_ids, decoder_input = self._shifted_embeddings(
            input_ids, position_ids, embedding, packed_seq_params)
        if padding_mask is not None:  # megatron-core >= 0.18 threads a padding mask through the depths
            padding_mask, _ = roll_tensor(padding_mask, shifts=-1, dims=-1, cp_group=self.cp_group,
                                          packed_seq_params=packed_seq_params)
        hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
        kwargs = dict(attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
                      rotary_pos_sin=rotary_pos_sin, attention_bias=attention_bias,
                      inference_params=inference_params, packed_seq_params=packed_seq_params,
                      sequence_len_offset=sequence_len_offset)
        if self.config.recompute_granularity == "full" and self.training:
            x = tensor_parallel.checkpoint(
                lambda hs, di: self._combine_and_layer(hs, di, **kwargs),
                self.config.distribute_saved_activations, hidden_states, decoder_input,
            )
        else:
            x = self._combine_and_layer(hidden_states, decoder_input, **kwargs)
        x = make_viewless_tensor(inp=x, requires_grad=True, keep_graph=True)
        return mtp_layer_outputs(x, input_ids, position_ids, padding_mask)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Children and own parameters; hc_head_* added explicitly (never rely on the default walk)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        sd.update(contraction_sharded_state_dict(self, prefix, metadata))
        return sd
