"""Every difference between the megatron-core releases dsv4 supports (0.16.1 through 0.19.x), in one place.

Each shim detects the feature (an attribute, a signature, a return arity) rather than comparing
version strings, and names the versions and the megatron change it covers. Call sites elsewhere
make one call here. Importing this module imports neither torch nor megatron: the package
versions below come from installed package metadata (`dsv4 --version` must stay cheap).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from importlib import metadata
from typing import Optional

# Distribution names as pip knows them, in the order `dsv4 --version` prints them.
_DISTRIBUTIONS = ("dsv4", "megatron-core", "torch")


def package_version(distribution: str) -> Optional[str]:
    """The installed version of a distribution from its metadata (None when not installed); imports nothing."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def megatron_core_version(imported: bool = False) -> Optional[str]:
    """megatron-core's version, e.g. '0.16.1', from package metadata (no megatron import). With
    `imported`, a megatron on sys.path without pip metadata (a source checkout) is asked directly."""
    version = package_version("megatron-core")
    if version is None and imported:
        try:
            from megatron.core import package_info

            version = package_info.__version__
        except ImportError:
            return None
    return version


def version_line() -> str:
    """'dsv4 0.1.0 (megatron-core 0.16.1, torch 2.13.0+cpu)': what `dsv4 --version` prints."""
    from dsv4cli import __version__

    dsv4 = package_version("dsv4") or __version__
    others = ", ".join(f"{d} {package_version(d) or 'not installed'}" for d in _DISTRIBUTIONS[1:])
    return f"dsv4 {dsv4} ({others})"


# --------------------------------------------------------------------------- install

_APPLIED = False


def apply() -> None:
    """Make checkpoints load the same under every supported megatron-core (idempotent; call before
    loading checkpoints: `initialize_parallel` does): the embedded common state of 0.19 saves, and
    optimizer param groups matched as 0.16-0.18 match them (see both below)."""
    global _APPLIED
    if not _APPLIED:
        from dsv4cli.compat.megatron_patches import version_patches

        for patch in version_patches():
            patch.installer()()
        _APPLIED = True


# --------------------------------------------------------------------------- checkpoints

# The ShardedObject key megatron-core 0.19 stores the common (non-tensor) state under.
COMMON_STATE_OBJECT = "common_state"


def patch_common_state_reader() -> None:
    """megatron-core 0.16-0.18 keep a checkpoint's common state (optimizer param groups, Adam step, ...)
    in `common.pt`; 0.19 stores it inside the torch_dist files as the ShardedObject "common_state"
    and writes no common.pt (it still reads old ones). Where the installed megatron has no reader for
    the embedded form, its common-state loader learns it, so a checkpoint saved under 0.19 loads under
    0.16-0.18. Tensor keys are the same in all; their loaders ignore the extra object.
    """
    from pathlib import Path

    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import common

    if hasattr(serialization, "_legacy_common_state_exists"):  # 0.19: reads both forms itself
        return

    def or_embedded(read_common_pt):
        def load(checkpoint_dir):
            if not (Path(checkpoint_dir) / common.COMMON_STATE_FNAME).exists():
                embedded = read_embedded_common_state(checkpoint_dir)
                if embedded is not None:
                    return embedded
            return read_common_pt(checkpoint_dir)

        return load

    if hasattr(common, "TorchCommonLoadStrategy"):  # 0.16: a strategy class's method
        original = common.TorchCommonLoadStrategy.load_common
        common.TorchCommonLoadStrategy.load_common = (
            lambda self, checkpoint_dir: or_embedded(lambda d: original(self, Path(d)))(checkpoint_dir))
    else:  # 0.17-0.18: a function, imported by name into serialization
        load_common = or_embedded(common.load_common)
        common.load_common = serialization.load_common = load_common


def read_embedded_common_state(checkpoint_dir) -> Optional[dict]:
    """The common state a megatron-core >= 0.19 save embeds in the torch_dist files; None if absent."""
    import io

    import torch
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    reader = FileSystemReader(str(checkpoint_dir))
    stored = reader.read_metadata().state_dict_metadata
    keys = [k for k, v in stored.items()
            if k.split("/", 1)[0] == COMMON_STATE_OBJECT and isinstance(v, BytesStorageMetadata)]
    if not keys:
        return None
    state = {keys[0]: io.BytesIO()}
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": a one-process read is meant
        warnings.simplefilter("ignore", UserWarning)
        load(state, storage_reader=reader, no_dist=True)
    loaded = state[keys[0]]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, map_location="cpu", weights_only=True)
    return loaded[0]


# Identify an optimizer param group by what the model decides (weight-decay / lr multipliers, expert
# and decoupled-lr flags): megatron-core 0.16-0.18's `param_group_identifier_keys`.
_STRUCTURAL_GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def patch_optimizer_group_matching() -> None:
    """megatron-core 0.16-0.18 pair a saved optimizer param group with the run's by (wd_mult, lr_mult,
    is_expert_parallel, is_decoupled_lr); 0.19 adds the schedule values (max_lr, min_lr, start_wd,
    end_wd, optimizer) to that key, so resuming with another `train.lr` fails there ("Could not find
    parameter group with key ..."). dsv4's groups differ only by those four: its one per-group
    override, the indexer's groups of a spec with an indexer warm-up (`lr_mult = "indexer"`,
    dsv4cli.build.optimizer), is told apart
    by `lr_mult` and sets no schedule values of its own, so the old key pairs the same groups; with
    it, a resume behaves alike under all."""
    from megatron.core.optimizer import distrib_optimizer, optimizer

    for module in (optimizer, distrib_optimizer):
        keys = getattr(module, "param_group_identifier_keys", None)
        if keys is not None and set(keys) > set(_STRUCTURAL_GROUP_KEYS):
            module.param_group_identifier_keys = _STRUCTURAL_GROUP_KEYS


# --------------------------------------------------------------------------- MTP


def _mtp_helper():
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    return MTPLossLoggingHelper


def mtp_loss_key() -> str:
    """The `MTPLossLoggingHelper.tracker` key of the per-depth loss sums.

    megatron-core 0.16-0.18: `save_loss_to_tracker` sums losses in tracker["values"]; 0.19 renamed it
    `save_metrics_to_tracker` (which also counts accepted tokens) and the key to "loss_values".
    """
    return "loss_values" if hasattr(_mtp_helper(), "save_metrics_to_tracker") else "values"


def mtp_tracked_losses():
    """The tracker's per-depth MTP loss sums [depth] (a live tensor: zero it to reset), or None."""
    return _mtp_helper().tracker.get(mtp_loss_key())


def mtp_layer_submodules(layer_spec, **fields):
    """`MultiTokenPredictionLayerSubmodules(**fields)` with the depth's inner layer `layer_spec`.

    megatron-core 0.16 names that field `transformer_layer`; 0.17 renamed it `mtp_model_layer` (it
    may hold a hybrid stack). The module attribute follows, but 0.17+ map the checkpoint keys back
    to `transformer_layer.`, so stored names do not change.
    """
    import dataclasses

    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayerSubmodules

    names = {f.name for f in dataclasses.fields(MultiTokenPredictionLayerSubmodules)}
    key = "mtp_model_layer" if "mtp_model_layer" in names else "transformer_layer"
    return MultiTokenPredictionLayerSubmodules(**fields, **{key: layer_spec})


def mtp_inner_layer_spec(submodules):
    """The inner layer spec of `MultiTokenPredictionLayerSubmodules` (see `mtp_layer_submodules`)."""
    spec = getattr(submodules, "mtp_model_layer", None)
    return spec if spec is not None else submodules.transformer_layer


class MtpInnerLayerAlias:
    """Mixin for an MTP layer class whose inner layer is the attribute `transformer_layer`: also
    answers to `mtp_model_layer`, the name megatron-core 0.17+ reach it by (the schedules set
    `current_microbatch` on it through `cuda_graphs.set_current_microbatch`). A property, so the
    module tree and its checkpoint keys keep the one name `transformer_layer`."""

    @property
    def mtp_model_layer(self):
        return self.transformer_layer


@functools.cache
def _mtp_layer_takes_padding_mask() -> bool:
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer

    return "padding_mask" in inspect.signature(MultiTokenPredictionLayer.forward).parameters


def mtp_layer_outputs(hidden_states, input_ids, position_ids, padding_mask) -> tuple:
    """What an MTP layer's forward returns to megatron's `MultiTokenPredictionBlock`.

    megatron-core 0.16-0.17: (hidden_states, input_ids, position_ids); 0.18 threads the padding mask
    through the depths: (hidden_states, input_ids, position_ids, padding_mask).
    """
    if _mtp_layer_takes_padding_mask():
        return hidden_states, input_ids, position_ids, padding_mask
    return hidden_states, input_ids, position_ids


# --------------------------------------------------------------------------- MoE spec


def moe_spec_submodules(moe_spec):
    """The `MoESubmodules` of megatron's MoE layer spec: a `ModuleSpec` (megatron-core 0.16-0.18) or,
    from 0.19, `functools.partial(MoELayer, submodules=...)` (TransformerLayer calls it directly)."""
    if isinstance(moe_spec, functools.partial):
        return moe_spec.keywords["submodules"]
    return moe_spec.submodules


def moe_spec_with(moe_spec, module, submodules):
    """`moe_spec` in its own form (ModuleSpec or 0.19's partial) building `module` with `submodules`."""
    if isinstance(moe_spec, functools.partial):
        keywords = {k: v for k, v in moe_spec.keywords.items() if k != "submodules"}
        return functools.partial(module, *moe_spec.args, submodules=submodules, **keywords)
    return dataclasses.replace(moe_spec, module=module, submodules=submodules)
