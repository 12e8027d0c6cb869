"""megatron-core modules that assume CUDA or Transformer Engine: MoE, MLA, selective
recompute, the torch_dist checkpoint writer.

Installed by `dsv4cli.compat.activate()` without CUDA; each `patch_*` function is one record of
`dsv4cli.compat.megatron_patches.PATCHES`, which says why.
"""

from __future__ import annotations

import queue


def patch_moe() -> None:
    """MoE without TE: `te_general_gemm = None`; all-to-all split sizes of CPU tensors as numpy arrays."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        import torch

        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.detach().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def patch_mla() -> None:
    """multi_latent_attention.HAVE_TE = False when transformer_engine does not import."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        from megatron.core.transformer import multi_latent_attention

        multi_latent_attention.HAVE_TE = False


def patch_checkpoint_without_output() -> None:
    """Without TE there is no fp8: make CheckpointWithoutOutput skip its FP8GlobalStateManager calls."""
    from megatron.core.tensor_parallel import random as mrandom

    if mrandom.HAVE_TE:
        return

    original_init = mrandom.CheckpointWithoutOutput.__init__

    def __init__(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = False

    mrandom.CheckpointWithoutOutput.__init__ = __init__


def patch_dist_checkpointing() -> None:
    """torch_dist save: write every bucket in this process (no fork, no spawn Manager)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    results = queue.Queue()
    fsa._get_write_results_queue = lambda: results

    def write_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue):
        local_results: queue.Queue = queue.Queue()
        count: queue.Queue = queue.Queue()
        collected: dict | Exception = {}
        for i, bucket in enumerate(write_buckets):
            count.put(i)
            fsa.FileSystemWriterAsync.write_preloaded_data(
                transform_list, i, bucket, local_results, count, True
            )
        for _ in write_buckets:
            idx, res = local_results.get_nowait()
            if isinstance(res, Exception):
                collected = res
                break
            collected[idx] = res
        global_results_queue.put(collected)

    fsa.FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write_in_process)
