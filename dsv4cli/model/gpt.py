"""The dsv4 GPT model: megatron's GPTModel, with n mHC streams in the decoder and MTP when n > 1.

n = config.mhc_streams (a Dsv4TransformerConfig, dsv4cli/model/config.py).
streams = 1: exactly megatron's GPTModel (plain residuals, plain MTP with eh_proj).
streams > 1: the decoder is a MultiStreamTransformerBlock, built here explicitly (megatron's
GPTModel.__init__ builds its own TransformerBlock by name; it gets an empty one, which is replaced
in place, so parameters keep megatron's order: embedding, decoder, mtp, output_layer). MTP depths are
MultiStreamMTPLayers fed by the decoder's un-contracted streams; every depth's head (contraction +
final norm) feeds the shared output layer, and megatron's own MTP loss code (MTPLossAutoScaler,
MTPLossLoggingHelper, per-depth scale loss_scale / D) computes the losses.

Pipeline stages exchange [s, b, n*h]: megatron's schedules size p2p buffers from
`get_model_config(model).hidden_size`, so for n > 1 `model.config` is a shallow copy of the layer
config with hidden_size = n*h (layers keep the real config; `model.hidden_size` is h).
"""

from __future__ import annotations

import copy

import torch

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.quantization.utils import get_quant_config_or_none
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from dsv4cli.model.multi_stream_block import MultiStreamTransformerBlock


class Dsv4GPTModel(GPTModel):
    """GPTModel with mHC streams (n = config.mhc_streams).

    forward as GPTModel: per-token loss [b, s] or logits [b, s, V]."""

    def __init__(self, config, transformer_layer_spec, *args, **kwargs):
        streams = getattr(config, "mhc_streams", 1)
        if streams == 1:
            super().__init__(config, transformer_layer_spec, *args, **kwargs)
        else:
            super().__init__(config, TransformerBlockSubmodules(layer_specs=[], layer_norm=None), *args, **kwargs)
            self.transformer_layer_spec = transformer_layer_spec
            self.decoder = MultiStreamTransformerBlock(
                config=self.config, spec=transformer_layer_spec, pre_process=self.pre_process,
                post_process=self.post_process, pg_collection=self.pg_collection, vp_stage=self.vp_stage,
            )
            for name, module in self.decoder.named_modules(prefix="decoder"):  # as GPTModel.__init__ ends
                if hasattr(module, "finish_init"):
                    module.finish_init(get_quant_config_or_none(name, self.config.quant_recipe))
            # PATCH (stays; megatron-core 0.16.1): the pipeline schedules size their p2p buffers as
            # [s, b, get_model_config(model).hidden_size] and offer no per-model shape; stages here
            # exchange [s, b, n*h]. So the model's own `config` is a copy with hidden_size = n*h;
            # every submodule keeps the real config (built above with hidden_size = h).
            p2p_config = copy.copy(config)
            p2p_config.hidden_size = config.stream_width
            self.config = p2p_config
        self.streams = streams
        self.hidden_size = config.hidden_size

    def forward(self, input_ids, position_ids, attention_mask, *args, extra_block_kwargs=None, **kwargs):
        """GPTModel.forward; a decoder with hash-routed layers (DeepSeek-V4) is also given the token
        ids, as `token_ids` [s, b] (megatron's layout: input_ids.t())."""
        if input_ids is not None and getattr(self.decoder, "needs_token_ids", False):
            extra_block_kwargs = {**(extra_block_kwargs or {}), "token_ids": input_ids.t()}
        return super().forward(input_ids, position_ids, attention_mask, *args,
                               extra_block_kwargs=extra_block_kwargs, **kwargs)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb, rotary_pos_cos,
                     rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None, **kwargs):
        """Heads for every MTP depth (n > 1), then megatron's loss code; logits without labels."""
        if labels is None:
            return self._logits_only(hidden_states, kwargs.get("runtime_gather_output"))
        if mtp_in_postprocess and self.streams > 1:
            streams = self.mtp(
                input_ids=input_ids, position_ids=position_ids, hidden_states=hidden_states,
                attention_mask=kwargs.get("attention_mask"), inference_params=kwargs.get("inference_params"),
                rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                packed_seq_params=kwargs.get("packed_seq_params"),
                sequence_len_offset=kwargs.get("sequence_len_offset"), embedding=self.embedding,
                **{k: v for k, v in (kwargs.get("extra_block_kwargs") or {}).items() if k != "token_ids"},
            )
            parts = torch.chunk(streams, 1 + len(self.mtp.layers), dim=0)
            heads = [self.decoder.head(parts[0])]
            heads += [layer.head(part) for layer, part in zip(self.mtp.layers, parts[1:])]
            hidden_states = torch.cat(heads, dim=0)
            mtp_in_postprocess = False
        return super()._postprocess(hidden_states, input_ids, position_ids, labels, rotary_pos_emb,
                                    rotary_pos_cos, rotary_pos_sin, mtp_in_postprocess=mtp_in_postprocess,
                                    loss_mask=loss_mask, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """megatron's, with `metadata['dp_cp_group']` filled in: GPTModel.sharded_state_dict indexes it
        on an MTP stage without the embedding stage (pp > 1) and fails for metadata=None."""
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        return super().sharded_state_dict(prefix, sharded_offsets, ensure_metadata_has_dp_cp_group(metadata))

    def _logits_only(self, hidden_states, runtime_gather_output=None):
        """Main-model logits [b, s, V] (MTP is training-only; megatron's code needs labels for it)."""
        if not self.post_process:
            return hidden_states
        if self.streams > 1 and self.decoder.return_streams:
            hidden_states = self.decoder.head(hidden_states)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=weight, runtime_gather_output=runtime_gather_output)
        return logits.transpose(0, 1).contiguous()
