"""Layout-independent initialisation: one seed gives the same fresh model under any PP/VPP layout.

Megatron builds a stage's modules in order, all drawing from one RNG stream, so with PP=2 the
second stage's first layer would draw what layer 1 draws with PP=1. Instead every unit draws from
its own stream, reseeded (torch's default generator and megatron's RNG tracker) from (seed, unit):

    embedding                 unit 0                  reseeded before the model is built
    decoder layer L (global)  unit L (1-based)        reseeded as it is built (seeded_spec)
    MTP depth k (global)      unit MTP_UNIT + k       reseeded as it is built (seeded_spec)
    decoder contraction head  unit DECODER_HEAD_UNIT  re-drawn after construction (reinit_decoder_head)
    output layer              unit OUTPUT_UNIT        re-drawn after construction (reinit_output_layer)

Layers and MTP depths are seeded through their ModuleSpecs: `seeded_spec` wraps a spec in one
whose module (`SeededUnit`) reseeds from the unit megatron builds (its layer_number and offset)
and then builds the wrapped spec with megatron's `build_module`, so megatron's blocks build them as
usual and no megatron function is replaced. The seed travels in the spec; nothing is global.

TP: on CPU (`use_cpu_initialization`) megatron draws each full master weight from the default
generator and slices it, so shards agree with TP=1; on GPU it draws shards from the tracker's
per-TP-rank state (megatron's behaviour, kept).
Not covered: EP>1 (each rank builds only its local experts from the layer's stream).

The builder (dsv4cli/build/model.py) restores all RNG states after the build, so it consumes
nothing from the caller's streams.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

EMBEDDING_UNIT = 0
MTP_UNIT = 1 << 20
OUTPUT_UNIT = 1 << 21
DECODER_HEAD_UNIT = OUTPUT_UNIT + 1


def unit_seed(seed: int, unit: int) -> int:
    """(seed, unit) -> the seed a unit's initialisation draws from (distinct per unit)."""
    return (int(seed) * 1_000_003 + int(unit) * 7_919 + 104_729) % (2**31 - 1)


def reseed(seed: int, unit: int) -> None:
    """Reseed torch's default generator and megatron's RNG tracker for (seed, unit)."""
    import torch
    from megatron.core import tensor_parallel

    s = unit_seed(seed, unit)
    torch.manual_seed(s)
    tensor_parallel.model_parallel_cuda_manual_seed(s)


@contextlib.contextmanager
def tracker_preserved():
    """megatron's RNG tracker (its states, seeds, initialised flag) restored on exit."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = (dict(getattr(tracker, "states_", {})), set(getattr(tracker, "seeds_", set())),
             getattr(tracker, "_is_initialized", False))
    try:
        yield
    finally:
        if hasattr(tracker, "states_"):
            tracker.states_, tracker.seeds_, tracker._is_initialized = saved


def decoder_unit(kwargs: dict) -> int:
    """build_module kwargs of a decoder layer -> its unit: the global 1-based layer number."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pg = kwargs.get("pg_collection")
    pp_rank = pg.pp.rank() if pg is not None and getattr(pg, "pp", None) is not None else None
    return kwargs["layer_number"] + get_transformer_layer_offset(kwargs["config"], kwargs.get("vp_stage"), pp_rank)


def mtp_unit(kwargs: dict) -> int:
    """build_module kwargs of an MTP layer -> its unit: MTP_UNIT + the global 1-based depth."""
    from megatron.core.transformer.multi_token_prediction import get_mtp_layer_offset

    return MTP_UNIT + kwargs["layer_number"] + get_mtp_layer_offset(kwargs["config"], kwargs.get("vp_stage"))


class SeededUnit:
    """ModuleSpec module: reseed from (seed, unit_of(kwargs)), then build `unit_spec` with the same
    arguments (a factory: the built object is the wrapped spec's module, not a SeededUnit)."""

    def __new__(cls, *args, unit_spec, seed: int, unit_of, **kwargs):
        from megatron.core.transformer.spec_utils import build_module

        reseed(seed, unit_of(kwargs))
        return build_module(unit_spec, *args, **kwargs)


def seeded_spec(spec, seed: int, unit_of):
    """A ModuleSpec that builds `spec` after reseeding from (seed, unit_of(build kwargs))."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=SeededUnit, params=dict(unit_spec=spec, seed=seed, unit_of=unit_of))


def seeded_layers(block_spec, seed: int, unit_of):
    """A block's submodules (TransformerBlockSubmodules or MultiTokenPredictionBlockSubmodules) with
    every layer spec seeded; None stays None."""
    if block_spec is None:
        return None
    return replace(block_spec, layer_specs=[seeded_spec(s, seed, unit_of) for s in block_spec.layer_specs])


def reinit_decoder_head(model, seed: int) -> None:
    """Redraw the decoder's learned contraction hc_head_fn [n, n*h] (xavier, fp32, on the default
    device, then copied to the parameter's device) from DECODER_HEAD_UNIT's stream: the same head
    whichever layers this stage built before it. hc_head_base / hc_head_scale are constants."""
    import torch

    fn = getattr(getattr(model, "decoder", None), "hc_head_fn", None)
    if fn is None or fn.device.type == "meta":
        return
    reseed(seed, DECODER_HEAD_UNIT)
    drawn = torch.empty(fn.shape, dtype=torch.float32)
    with torch.no_grad():
        torch.nn.init.xavier_uniform_(drawn)
        fn.copy_(drawn)


def reinit_output_layer(model, seed: int) -> None:
    """Redraw the untied output layer's weight [V/tp, h] from OUTPUT_UNIT's stream, the way megatron
    initialises a ColumnParallelLinear (full master weight on CPU, sliced; tracker-forked on GPU)."""
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    layer = getattr(model, "output_layer", None)
    weight = getattr(layer, "weight", None)
    config = model.config
    if weight is None or model.share_embeddings_and_output_weights or not config.perform_initialization:
        return
    if weight.device.type == "meta":
        return
    reseed(seed, OUTPUT_UNIT)
    tp_group = getattr(layer, "tp_group", None)
    rank = tp_group.rank() if tp_group is not None else 0
    world = tp_group.size() if tp_group is not None else 1
    with torch.no_grad():
        if config.use_cpu_initialization:
            _initialize_affine_weight_cpu(
                weight, layer.output_size, layer.input_size, weight.shape[0], 0, config.init_method,
                params_dtype=config.params_dtype, rank=rank, world_size=world,
                skip_set_tensor_parallel_attributes=True,
            )
        else:  # what _initialize_affine_weight_gpu draws (its TP attributes are already set)
            with get_cuda_rng_tracker().fork():
                config.init_method(weight)
