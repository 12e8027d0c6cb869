"""CPU replacements of megatron's local multi-tensor helpers (no TE / apex): one foreach call per list.

Without Transformer Engine or apex, megatron's optimizer and gradient clipping fall back to
`megatron.core.utils.local_multi_tensor_l2_norm` / `local_multi_tensor_scale`, which loop over the
tensors in Python (a `torch.norm` per tensor, then `torch.tensor()` of the list of 0-dim norms; a
`dst.copy_(src * scale)` per tensor). With many small parameters (5 per mHC hyper-connection) that is
hundreds of tiny ops per step, each one also intercepted by the `cuda_as_cpu()` mode around
`clip_grad_by_total_norm_fp32`. The replacements compute the same values with torch's foreach ops
(the same per-tensor kernels, called from C++): results are bit-identical (tests/test_compat_multi_tensor.py).

Imports torch only when installed (`patch_multi_tensor`, from `dsv4cli.compat.activate()` on CPU).
"""

from __future__ import annotations


def multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """tensor_lists [[t, ...], ...] -> (l2 norm of all tensors together [1] (float32), None), as
    megatron's local_multi_tensor_l2_norm (which ignores `per_tensor` as well)."""
    import torch

    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        return torch.zeros(1, dtype=torch.float), None
    norms = torch.stack(torch._foreach_norm(tensors)).to(torch.float)
    return torch.linalg.vector_norm(norms).reshape(1), None


def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """dst_i = src_i * scale for tensor_lists = [srcs, dsts] (in place when they are the same tensors),
    as megatron's local_multi_tensor_scale."""
    import torch

    srcs, dsts = tensor_lists[0], tensor_lists[1]
    if not dsts:
        return
    if all(s is d for s, d in zip(srcs, dsts)):
        torch._foreach_mul_(list(dsts), scale)
    else:
        torch._foreach_copy_(list(dsts), torch._foreach_mul(list(srcs), scale))


def patch_multi_tensor() -> None:
    """megatron's optimizer / clip_grads local multi-tensor helpers -> the foreach versions above
    (only where megatron fell back to its local ones: with TE or apex nothing is replaced)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    for mod in (clip_grads, optimizer):
        if getattr(mod, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            mod.multi_tensor_scale_impl = multi_tensor_scale
    if getattr(clip_grads, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = multi_tensor_l2_norm
