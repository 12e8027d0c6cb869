"""Spec -> a Dsv4GPTModel for this pipeline stage (call after initialize_parallel)."""

from __future__ import annotations

from typing import Optional

from dsv4cli.spec.schema import Spec


def build_model(spec: Spec, pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
    """Build the model chunk of this rank: Dsv4GPTModel (a megatron GPTModel subclass).

    forward(input_ids [b,s], position_ids [b,s], attention_mask=None, labels=[b,s], loss_mask=[b,s])
    -> per-token main loss [b, s]; logits [b, s, V] when labels is None. MTP losses enter the
    gradient through MTPLossAutoScaler and are tracked per depth (unscaled) in MTPLossLoggingHelper.

    Call after `initialize_parallel(spec)`; if megatron's model-parallel state is not initialized
    yet, this does it (torchrun's environment, or a one-process group).
    """
    from dsv4cli.build.config import transformer_config

    _ensure_parallel(spec)
    return build_model_from_config(spec, transformer_config(spec), pre_process, post_process, vp_stage)


def _ensure_parallel(spec: Spec) -> None:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        from dsv4cli.build.parallel import initialize_parallel

        initialize_parallel(spec)


def build_model_from_config(spec: Spec, config, pre_process: bool = True, post_process: bool = True,
                            vp_stage: Optional[int] = None, backend=None):
    """build_model with an explicit TransformerConfig (and optionally a Backend of layer_specs)."""
    import torch

    from dsv4cli.build.layer_specs import select_backend
    from dsv4cli.model.init_seed import reinit_output_layer, seeded_units

    backend = backend or select_backend()
    # Every unit (embedding, layer L, MTP depth k, output) draws from (seed, unit), seed = the one
    # last given to torch.manual_seed (train.seed in training): the same fresh model under any
    # PP/VPP layout (dsv4cli/model/init_seed.py).
    with seeded_units(torch.initial_seed()):
        model = _new_model(spec, config, pre_process, post_process, vp_stage, backend)
        reinit_output_layer(model)
    return model


def _new_model(spec: Spec, config, pre_process, post_process, vp_stage, backend):
    from dsv4cli.build.config import padded_vocab_size
    from dsv4cli.build.layer_specs import decoder_block_spec, mtp_block_spec
    from dsv4cli.model.gpt import Dsv4GPTModel

    m = spec.model
    return Dsv4GPTModel(
        config,
        decoder_block_spec(spec, config, vp_stage=vp_stage, backend=backend),
        vocab_size=padded_vocab_size(spec),
        max_sequence_length=m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=m.rotary_base,
        mtp_block_spec=mtp_block_spec(spec, config, vp_stage=vp_stage, backend=backend),
        vp_stage=vp_stage,
        streams=m.mhc.streams,
    )

