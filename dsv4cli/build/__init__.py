"""Spec -> megatron-core TransformerConfig, ModuleSpecs and models (imports megatron lazily).

Public API (training and checkpoint tools rely on it):
    transformer_config(spec, world_size=None) -> TransformerConfig
    build_model(spec, pre_process=True, post_process=True, vp_stage=None) -> Dsv4GPTModel
    build_model_chunks(spec) -> [Dsv4GPTModel] (one per virtual pipeline stage of this rank, on its device)
    initialize_parallel(spec, seed=None, backend=None) -> ParallelDims / destroy_parallel() / single_process(spec)
    padded_vocab_size(spec), decoder_layer_spec(spec), decoder_block_spec(...), mtp_block_spec(...)
`dsv4 inspect model` builds and describes a model in `model_summary.py`; `padded_vocab_size` and
`check_supported` come from the spec layer (spec/estimate.py, spec/rules.py).
"""

from __future__ import annotations

from dsv4cli.build.config import (
    UnsupportedSpecError,
    check_supported,
    padded_vocab_size,
    recompute_settings,
    transformer_config,
)
from dsv4cli.build.layer_specs import decoder_block_spec, decoder_layer_spec, mtp_block_spec, select_backend
from dsv4cli.build.model import build_model
from dsv4cli.build.parallel import (
    build_model_chunks,
    destroy_parallel,
    free_port,
    init_process_group,
    initialize_parallel,
    single_process,
)

__all__ = [
    "UnsupportedSpecError",
    "build_model",
    "build_model_chunks",
    "check_supported",
    "decoder_block_spec",
    "decoder_layer_spec",
    "destroy_parallel",
    "free_port",
    "init_process_group",
    "initialize_parallel",
    "mtp_block_spec",
    "padded_vocab_size",
    "recompute_settings",
    "select_backend",
    "single_process",
    "transformer_config",
]
