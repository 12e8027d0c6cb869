"""Spec -> a Dsv4GPTModel for this pipeline stage (call after initialize_parallel)."""

from __future__ import annotations

import contextlib
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
    from dsv4cli.build.parallel import ensure_parallel

    ensure_parallel(spec)
    return build_model_from_config(spec, transformer_config(spec), pre_process, post_process, vp_stage)


def build_model_from_config(spec: Spec, config, pre_process: bool = True, post_process: bool = True,
                            vp_stage: Optional[int] = None, backend=None):
    """build_model with an explicit (Dsv4)TransformerConfig (and optionally a Backend of layer_specs)."""
    import torch

    from dsv4cli.build.layer_specs import select_backend
    from dsv4cli.model.init_seed import EMBEDDING_UNIT, reinit_decoder_head, reinit_output_layer, reseed

    backend = backend or select_backend()
    # Every unit (embedding, layer L, MTP depth k, decoder head, output) draws from (seed, unit),
    # seed = the one last given to torch.manual_seed (train.seed in training): the same fresh model
    # under any PP/VPP layout (dsv4cli/model/init_seed.py). The caller's RNG streams are untouched.
    seed = torch.initial_seed()
    with _rng_preserved():
        reseed(seed, EMBEDDING_UNIT)
        model = _new_model(spec, config, pre_process, post_process, vp_stage, backend, seed)
        reinit_decoder_head(model, seed)
        reinit_output_layer(model, seed)
    return model


@contextlib.contextmanager
def _rng_preserved():
    """torch's CPU generator, the CUDA generators (torch.manual_seed reseeds them all; none on a CPU
    machine) and megatron's RNG tracker are restored on exit."""
    import torch

    from dsv4cli.model.init_seed import tracker_preserved

    with torch.random.fork_rng(devices=range(torch.cuda.device_count())), tracker_preserved():
        yield


def _new_model(spec: Spec, config, pre_process, post_process, vp_stage, backend, seed: int):
    from dsv4cli.build.config import padded_vocab_size
    from dsv4cli.build.layer_specs import decoder_block_spec, mtp_block_spec
    from dsv4cli.model.gpt import Dsv4GPTModel
    from dsv4cli.model.init_seed import decoder_unit, mtp_unit, seeded_layers

    m = spec.model
    decoder = decoder_block_spec(spec, config, vp_stage=vp_stage, backend=backend)
    mtp = mtp_block_spec(spec, config, vp_stage=vp_stage, backend=backend)
    return Dsv4GPTModel(
        config,
        seeded_layers(decoder, seed, decoder_unit),
        vocab_size=padded_vocab_size(spec),
        max_sequence_length=m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_embeddings,
        # DeepSeek-V4 attention rotates inside each layer (its own two RoPE settings)
        position_embedding_type="rope" if m.attention is None else "none",
        rotary_base=m.rotary_base,
        mtp_block_spec=seeded_layers(mtp, seed, mtp_unit),
        vp_stage=vp_stage,
    )

