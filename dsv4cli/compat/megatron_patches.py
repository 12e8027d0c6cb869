"""THE list of every patch of megatron-core (and torch.cuda) internals dsv4 keeps.

A patch here replaces an attribute of a module or class that dsv4 does not own, because the public
API offers no way to get the behaviour; wherever the public API allows, dsv4 constructs or
configures instead (own core attention, own norms, config flags) and nothing is listed.

Each record says what it replaces, why, and the megatron-core versions it was checked against
(`checked`: the patch was read against that version's source and the tests pass with it).
`when` says who installs it:
- "cpu": `dsv4cli.compat.activate()` on a machine without CUDA, in this order (never on a GPU);
- "version": `dsv4cli.compat.versions.apply()` on every device (from `initialize_parallel`): the
  differences between megatron-core releases that a checkpoint must not see;
- "model": part of the model's own construction on every device (`function` names the class that
  does it; its code site carries a `PATCH (stays)` comment). Everything else that once patched
  megatron inside the model is now explicit construction (docs/model.md).

tests/test_compat_patches.py holds the table to the code: every `patch_*` function of the compat
package is a record here, every record names a function that exists, and every record was
checked against the installed megatron-core. Upgrading megatron-core means re-reading each
patched function in the new version, then adding the version to `checked` (or dropping the patch).

Imports nothing (the functions are named, and imported only when installed).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class MegatronPatch:
    name: str
    function: str  # "module:function" that installs the patch
    patches: str  # what it replaces
    why: str
    checked: tuple[str, ...] = ("0.16.1", "0.17.1", "0.18.2", "0.19.2")
    when: str = "cpu"

    def installer(self) -> Callable[[], None]:
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(module), attr)


_CPU = "dsv4cli.compat.cpu"
_RNG = "dsv4cli.compat.cpu_rng"
_MEG = "dsv4cli.compat.cpu_megatron"
_DISTOPT = "dsv4cli.compat.distopt"
_MT = "dsv4cli.compat.multi_tensor"
_MODEL = "dsv4cli.model"
_VERSIONS = "dsv4cli.compat.versions"

PATCHES: tuple[MegatronPatch, ...] = (
    MegatronPatch(
        "torch_cuda", f"{_CPU}:patch_torch_cuda",
        "torch.cuda.current_device / synchronize / Stream / Event / current_stream / default_stream / "
        "stream, Tensor.record_stream",
        "megatron asks for the current CUDA device (global memory buffer, p2p shapes, router, RoPE, "
        "dist-ckpt) and for streams/events (MoE dispatcher); torch raises without CUDA",
    ),
    MegatronPatch(
        "rng_tracker", f"{_RNG}:patch_rng",
        "tensor_parallel.random: _CUDA_RNG_STATE_TRACKER, initialize_rng_tracker, _get/_set_cuda_rng_state; "
        "torch.cuda.manual_seed(_all) / get_rng_state / set_rng_state",
        "the tracker forks CUDA generators only; dsv4 keeps megatron's interface and seed offsets on the "
        "CPU generator, and activation recompute's CUDA RNG save/restore become no-ops",
    ),
    MegatronPatch(
        "moe_without_te", f"{_MEG}:patch_moe",
        "moe_utils.te_general_gemm, moe_utils/token_dispatcher.maybe_move_tensor_to_cpu",
        "without TE `te_general_gemm` is undefined (NameError); the all-to-all split sizes stayed "
        "tensors for CPU tensors and broke EP = 2 (they must be numpy arrays)",
    ),
    MegatronPatch(
        "mla_without_te", f"{_MEG}:patch_mla",
        "multi_latent_attention.HAVE_TE",
        "it is True without Transformer Engine installed; forced False when transformer_engine does not import",
    ),
    MegatronPatch(
        "checkpoint_without_output_fp8", f"{_MEG}:patch_checkpoint_without_output",
        "tensor_parallel.random.CheckpointWithoutOutput.__init__",
        "it sets `fp8 = fp8 is not None` (True for the default fp8=False) and then calls TE's "
        "FP8GlobalStateManager: selective 'layernorm' recompute dies with a NameError without TE",
    ),
    MegatronPatch(
        "dist_ckpt_in_process_writer", f"{_MEG}:patch_dist_checkpointing",
        "filesystem_async._get_write_results_queue, FileSystemWriterAsync.write_preloaded_data_multiproc",
        "the torch_dist writer forks a process per bucket and starts a spawn Manager (re-imports "
        "__main__, ~4.5 s per save); on CPU the buckets are written in-process (0.03-0.05 s)",
    ),
    MegatronPatch(
        "hardcoded_cuda_tensors", f"{_CPU}:patch_hardcoded_cuda",
        "the `torch` global of the modules in dsv4cli.compat.cpu.CUDA_HARDCODED_MODULES (schedules, "
        "optimizer, clip_grads, grad scaler, distrib_optimizer, param_and_grad_buffer, dist-ckpt, "
        "MoE utils, ...); Tensor.cuda",
        "those modules create tensors with a literal device='cuda'; they see a torch whose tensor "
        "factories map CUDA devices to the CPU (a process-wide TorchFunctionMode cost +8-15 % per step)",
    ),
    MegatronPatch(
        "clip_grads_type_check", f"{_CPU}:patch_clip_grads",
        "clip_grads/optimizer.clip_grad_by_total_norm_fp32",
        "it asserts `grad.type() == 'torch.cuda.FloatTensor'`; it runs inside cuda_as_cpu()",
    ),
    MegatronPatch(
        "multi_tensor_foreach", f"{_MT}:patch_multi_tensor",
        "clip_grads.l2_norm_impl / multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl (megatron's "
        "local_multi_tensor_l2_norm / local_multi_tensor_scale fallbacks, used without TE and apex)",
        "the fallbacks loop over the tensors in Python (a norm, or a multiply and a copy, per tensor, inside "
        "clip_grads' cuda_as_cpu mode): ~2 ms per step with the mHC parameters; torch's foreach ops give "
        "bit-identical values in one call",
        checked=("0.16.1", "0.19.2"),  # the same helpers and module attributes in both
    ),
    MegatronPatch(
        "distopt_param_groups", f"{_DISTOPT}:patch_distopt_param_groups",
        "DistributedOptimizer._build_model_and_main_param_groups",
        "it sorts params by `Tensor.type()` == 'torch.cuda.FloatTensor'; it runs inside cuda_as_cpu()",
    ),
    MegatronPatch(
        "distopt_torch_adam", f"{_DISTOPT}:patch_distopt_torch_adam",
        "DistributedOptimizer.state_dict / _set_main_param_and_optimizer_states / load_state_dict",
        "its checkpoints assume TE/apex FusedAdam; with torch's Adam a fresh optimizer's sharded state "
        "failed, the load copied a 'step' the checkpoint lacks, and all params shared ONE step tensor "
        "(a resume was not exact)",
    ),
    MegatronPatch(
        "common_state_reader", f"{_VERSIONS}:patch_common_state_reader",
        "dist_checkpointing.strategies.common: TorchCommonLoadStrategy.load_common (0.16) / load_common (0.17-0.18)",
        "megatron-core 0.19 embeds a checkpoint's common state in the torch_dist files (no common.pt); older "
        "releases learn to read it there, so a checkpoint saved under 0.19 loads under 0.16-0.18 (no-op on 0.19)",
        when="version",
    ),
    MegatronPatch(
        "optimizer_group_matching", f"{_VERSIONS}:patch_optimizer_group_matching",
        "optimizer / distrib_optimizer.param_group_identifier_keys (0.19)",
        "0.19 pairs saved optimizer param groups by a key that includes max_lr/min_lr, so a resume with another "
        "train.lr fails; the 0.16-0.18 structural key pairs the same groups (dsv4 sets no per-group overrides)",
        when="version",
    ),
    MegatronPatch(
        "p2p_hidden_size", f"{_MODEL}.gpt:Dsv4GPTModel",
        "Dsv4GPTModel.config: a shallow copy of the layer config with hidden_size = n*h (streams > 1)",
        "the pipeline schedules size their p2p buffers as [s, b, get_model_config(model).hidden_size] and "
        "take no per-model shape, while stages exchange the n streams [s, b, n*h]; `variable_seq_lengths` "
        "would instead send shapes with every micro-batch. Every submodule keeps the real config",
        when="model",
    ),
    MegatronPatch(
        "block_final_norm", f"{_MODEL}.multi_stream_block:MultiStreamTransformerBlock",
        "MultiStreamTransformerBlock.final_layernorm reads None (instance attribute set once in __init__; "
        "the norm stays registered under the same checkpoint key and runs in head())",
        "TransformerBlock.forward applies final_layernorm to the last layer's output whenever it is not "
        "None, with no hook to contract the n streams first; copying megatron's forward or renaming the "
        "checkpoint key were the alternatives",
        when="model",
    ),
)


def cpu_patches() -> tuple[MegatronPatch, ...]:
    """The records `dsv4cli.compat.activate()` installs without CUDA, in install order."""
    return tuple(p for p in PATCHES if p.when == "cpu")


def version_patches() -> tuple[MegatronPatch, ...]:
    """The records `dsv4cli.compat.versions.apply()` installs on every device, in install order."""
    return tuple(p for p in PATCHES if p.when == "version")


def unchecked(version: str) -> list[str]:
    """Names of the patches not checked against megatron-core `version`."""
    return [p.name for p in PATCHES if version not in p.checked]
