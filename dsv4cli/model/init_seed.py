"""Layout-independent initialisation: one seed gives the same fresh model under any PP/VPP layout.

Megatron builds a stage's modules in order, all drawing from one RNG stream, so with PP=2 the
second stage's first layer would draw what layer 1 draws with PP=1. Inside `seeded_units(seed)`
every unit reseeds the RNGs (torch's default generator and megatron's RNG tracker) from
(seed, unit) before it is built:

    embedding                 unit 0
    decoder layer L (global)  unit L (1-based)
    MTP depth k (global)      unit MTP_UNIT + k (1-based)
    decoder contraction head  unit DECODER_HEAD_UNIT (hc_head_*; the final norm is ones)
    output layer              unit OUTPUT_UNIT (re-drawn after construction: reinit_output_layer)

TP: on CPU (`use_cpu_initialization`) megatron draws
each full master weight from the default generator and slices it, so shards agree with TP=1;
on GPU it draws shards from the tracker's per-TP-rank state (megatron's behaviour, kept).
Not covered: EP>1 (each rank builds only its local experts from the layer's stream).

On exit all RNG states are restored to what they were on entry, so the build consumes nothing
from the caller's streams.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

EMBEDDING_UNIT = 0
MTP_UNIT = 1 << 20
OUTPUT_UNIT = 1 << 21
DECODER_HEAD_UNIT = OUTPUT_UNIT + 1

_state = {"seed": None, "depth": 0}


def active_seed() -> Optional[int]:
    """The base seed of the enclosing `seeded_units`, or None outside one."""
    return _state["seed"]


def unit_seed(seed: int, unit: int) -> int:
    """(seed, unit) -> the seed a unit's initialisation draws from (distinct per unit)."""
    return (int(seed) * 1_000_003 + int(unit) * 7_919 + 104_729) % (2**31 - 1)


def reseed(unit: int) -> None:
    """Reseed torch's default generator and megatron's RNG tracker for `unit` (inside seeded_units)."""
    import torch
    from megatron.core import tensor_parallel

    seed = _state["seed"]
    if seed is None:
        return
    s = unit_seed(seed, unit)
    torch.manual_seed(s)
    tensor_parallel.model_parallel_cuda_manual_seed(s)


def _save_rng():
    import torch
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tracker,
        "states": dict(getattr(tracker, "states_", {})),
        "seeds": set(getattr(tracker, "seeds_", set())),
        "initialized": getattr(tracker, "_is_initialized", False),
    }
    return saved


def _restore_rng(saved) -> None:
    import torch

    torch.set_rng_state(saved["cpu"])
    if saved["cuda"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda"])
    tracker = saved["tracker"]
    if hasattr(tracker, "states_"):
        tracker.states_ = saved["states"]
        tracker.seeds_ = saved["seeds"]
        tracker._is_initialized = saved["initialized"]


def _seeding_build_module(original, unit_of):
    """megatron's build_module, reseeding from `unit_of(kwargs)` for top-level layer builds."""

    @functools.wraps(original)
    def build_module(spec_or_module, *args, **kwargs):
        unit = unit_of(kwargs) if _state["depth"] == 0 and "layer_number" in kwargs else None
        if unit is None:
            return original(spec_or_module, *args, **kwargs)
        reseed(unit)
        _state["depth"] += 1
        try:
            return original(spec_or_module, *args, **kwargs)
        finally:
            _state["depth"] -= 1

    return build_module


def _decoder_unit(kwargs) -> Optional[int]:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = kwargs.get("config")
    pg = kwargs.get("pg_collection")
    pp_rank = pg.pp.rank() if pg is not None and getattr(pg, "pp", None) is not None else None
    return kwargs["layer_number"] + get_transformer_layer_offset(config, kwargs.get("vp_stage"), pp_rank)


def _mtp_unit(kwargs) -> Optional[int]:
    from megatron.core.transformer.multi_token_prediction import get_mtp_layer_offset

    return MTP_UNIT + kwargs["layer_number"] + get_mtp_layer_offset(kwargs.get("config"), kwargs.get("vp_stage"))


@contextlib.contextmanager
def seeded_units(seed: Optional[int]):
    """Build a model inside: units draw from (seed, unit) streams; RNG states restored on exit.

    seed None: a no-op (megatron's sequential stream). Starts with the embedding's stream.
    """
    if seed is None or _state["seed"] is not None:
        yield
        return
    from megatron.core.transformer import multi_token_prediction, transformer_block

    saved = _save_rng()
    originals = (transformer_block.build_module, multi_token_prediction.build_module)
    transformer_block.build_module = _seeding_build_module(originals[0], _decoder_unit)
    multi_token_prediction.build_module = _seeding_build_module(originals[1], _mtp_unit)
    _state["seed"] = int(seed)
    try:
        reseed(EMBEDDING_UNIT)
        yield
    finally:
        _state["seed"] = None
        _state["depth"] = 0
        transformer_block.build_module, multi_token_prediction.build_module = originals
        _restore_rng(saved)


def reinit_output_layer(model) -> None:
    """Redraw the untied output layer's weight [V/tp, h] from OUTPUT_UNIT's stream, the way megatron
    initialises a ColumnParallelLinear (full master weight on CPU, sliced; tracker-forked on GPU)."""
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    if _state["seed"] is None:
        return
    layer = getattr(model, "output_layer", None)
    weight = getattr(layer, "weight", None)
    config = model.config
    if weight is None or model.share_embeddings_and_output_weights or not config.perform_initialization:
        return
    if weight.device.type == "meta":
        return
    reseed(OUTPUT_UNIT)
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
