"""mHC and output-contraction ops (installed as `dsv4cli.kernels`): one public API, two backends.

Every op takes the multi-stream state `[..., n*h]` (stream-major) and an `impl`:
- "torch": plain PyTorch ops with hand-written backwards (`fast_cpu.py`: one autograd node per op,
  O(1) tensors kept for backward); the average contraction is the reference itself. The plain
  reference (`reference.py`, autograd) is the ground truth the tests compare both paths against;
- "native": the compiled CPU kernels (`mhc_cpu.c`, built on first use by `native_build.py` with the
  machine's C compiler; `native_ops.py`): everything per token in one pass, fp32. They take `mhc_pre`,
  `mhc_pre_mix`, `mhc_post` and `learned_output_contract` (the ops a training step runs); the other ops
  run the "torch" path under "native";
- "triton": the fused Triton kernels (`triton_ops/`, one module per op) with hand-written backward;
  on CPU tensors only under `TRITON_INTERPRET=1` (set before Triton is first imported);
- "auto": Triton when x is on CUDA and Triton imports; on CPU the compiled kernels where an op has them and
  they build (not for fp64, which gradcheck uses), the "torch" path otherwise.
Math: docs/design.md §2.2 (mHC) and §2.3 (contraction); docs/kernels.md.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from . import fast_cpu, fast_rms_norm, native_build, native_ops, reference

# The ops every backend implements: the reference's public functions but its two helpers and rms_norm
# (on CUDA that is torch's own fused kernel).
OPS = tuple(name for name in reference.__all__ if name not in ("compute_dtype", "stream_rms_rsqrt", "rms_norm"))
__all__ = [*OPS, "mhc_pre", "mhc_pre_mix", "mhc_post", "rms_norm", "resolve_impl", "triton_available"]

_IMPLS = ("auto", "torch", "native", "triton")


@functools.cache
def triton_available() -> bool:
    """True when `triton` imports (it may still lack a GPU; see resolve_impl)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve_impl(impl: str, x: Tensor) -> str:
    """'auto' | 'torch' | 'native' | 'triton' for tensor x -> 'torch' or 'triton' (ValueError when impossible);
    'native' resolves to 'torch' here (the ops with compiled CPU kernels ask `_native` first)."""
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "native":
        return "torch"
    if impl == "auto":
        # float64 (gradcheck) always takes the reference: the kernels compute in fp32
        return "triton" if (x.is_cuda and x.dtype != torch.float64 and triton_available()) else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' requested but triton cannot be imported")
        if not x.is_cuda and not _interpret_env():
            raise ValueError(
                f"impl='triton' on a {x.device.type} tensor needs TRITON_INTERPRET=1 (set before triton is "
                "imported); use impl='torch' or 'auto' for the CPU reference"
            )
    return impl


def _native(impl: str, *tensors: Tensor) -> bool:
    """True when the compiled CPU kernels take this call: impl 'native' (ValueError when they cannot), or
    'auto' with CPU tensors that are not fp64 and the kernels switched on and built."""
    if impl == "native":
        if not native_build.enabled():
            raise ValueError(f"impl='native' requested but {native_build.SWITCH}=0 switches the compiled kernels off")
        if not all(t.device.type == "cpu" and t.dtype != torch.float64 for t in tensors):
            raise ValueError("impl='native' takes CPU tensors in fp32 / bf16 / fp16")
        if native_build.library() is None:
            raise ValueError("impl='native' requested but the compiled CPU kernels could not be built")
        return True
    return impl == "auto" and native_build.enabled() and native_ops.usable(*tensors)


def _triton():
    from . import triton_ops

    return triton_ops


def learned_output_contract(
    x: Tensor, head_fn: Tensor, base: Tensor, scale: Tensor, n: int, eps: float, impl: str = "auto"
) -> Tensor:
    """[..., n*h] -> [..., h]: y = sum_i pre[i] x_i, pre = sigmoid((x @ head_fn^T) * rms^-1 * scale + base) + eps.

    head_fn [n, n*h], base [n], scale [1] (fp32 parameters); returns x's dtype.
    """
    if resolve_impl(impl, x) == "triton":
        return _triton().learned_output_contract(x, head_fn, base, scale, n, eps)
    if _native(impl, x):
        return native_ops.learned_output_contract(x, head_fn, base, scale, n, eps)
    return fast_cpu.learned_output_contract(x, head_fn, base, scale, n, eps)


def average_output_contract(x: Tensor, n: int, impl: str = "auto") -> Tensor:
    """[..., n*h] -> [..., h]: y = mean_i x_i (legacy contraction); returns x's dtype."""
    if resolve_impl(impl, x) == "triton":
        return _triton().average_output_contract(x, n)
    return reference.average_output_contract(x, n)


def mhc_mappings(
    x: Tensor, proj_weight: Tensor, alpha: Tensor, bias: Tensor, n: int, iterations: int, eps: float, impl: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """[..., n*h] -> (h_pre [..., n], h_post [..., n], h_res [..., n, n]) in fp32 (fp64 for fp64 inputs).

    proj_weight [n*n+2n, n*h]; alpha [3] (pre, post, res); bias [n*n+2n] ordered pre, post, res.
    """
    if resolve_impl(impl, x) == "triton":
        return _triton().mhc_mappings(x, proj_weight, alpha, bias, n, iterations, eps)
    return fast_cpu.mhc_mappings(x, proj_weight, alpha, bias, n, iterations, eps)


def mhc_pre(
    x: Tensor, proj_weight: Tensor, alpha: Tensor, bias: Tensor, n: int, iterations: int, eps: float, impl: str = "auto"
) -> tuple[Tensor, Tensor, Tensor]:
    """[..., n*h] -> (u [..., h], h_post [..., n], h_res [..., n, n]): mhc_mappings, then mhc_aggregate with
    its h_pre (one autograd node on the torch path)."""
    if resolve_impl(impl, x) == "triton":
        h_pre, h_post, h_res = mhc_mappings(x, proj_weight, alpha, bias, n, iterations, eps, impl="triton")
        return mhc_aggregate(x, h_pre, n, impl="triton"), h_post, h_res
    if _native(impl, x):
        return native_ops.mhc_pre(x, proj_weight, alpha, bias, n, iterations, eps)
    return fast_cpu.mhc_pre(x, proj_weight, alpha, bias, n, iterations, eps)


def mhc_pre_mix(
    x: Tensor, proj_weight: Tensor, alpha: Tensor, bias: Tensor, n: int, iterations: int, eps: float, impl: str = "auto"
) -> tuple[Tensor, Tensor, Tensor | tuple[Tensor, Tensor]]:
    """[..., n*h] -> (u [..., h], h_post [..., n], mix): mhc_pre, plus what `mhc_post(mix, f, h_post, n)` needs
    to finish the sub-layer (together they equal mhc_pre + mhc_post_res). The path decides what `mix` is:
    - torch: the residual mix r [..., n*h] (compute dtype), r_k = sum_j h_res[j, k] x_j, taken here while x
      is in cache (fast_cpu.mhc_pre_mix); mhc_post adds h_post (x) f to it in place;
    - triton: the pair (x, h_res); mhc_post runs the fused post-res kernel on it."""
    if resolve_impl(impl, x) == "triton":
        u, h_post, h_res = mhc_pre(x, proj_weight, alpha, bias, n, iterations, eps, impl="triton")
        return u, h_post, (x, h_res)
    if _native(impl, x):
        return native_ops.mhc_pre_mix(x, proj_weight, alpha, bias, n, iterations, eps)
    return fast_cpu.mhc_pre_mix(x, proj_weight, alpha, bias, n, iterations, eps)


def mhc_post(mix: Tensor | tuple[Tensor, Tensor], f: Tensor, h_post: Tensor, n: int, out_dtype=None,
             impl: str = "auto") -> Tensor:
    """mix from mhc_pre_mix, f [..., h], h_post [..., n] -> x' [..., n*h], x'_k = h_post[k] f + sum_j h_res[j,k] x_j,
    in out_dtype (default: the mix's / x's dtype). The torch / native paths' r is updated in place."""
    if isinstance(mix, tuple):  # mhc_pre_mix took the Triton path
        x, h_res = mix
        return mhc_post_res(x, f, h_post, h_res, n, impl="triton").to(out_dtype or x.dtype)
    if _native(impl, mix, f):
        return native_ops.mhc_post(mix, f, h_post, n, out_dtype)
    return fast_cpu.mhc_post(mix, f, h_post, n, out_dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float, impl: str = "auto") -> Tensor:
    """[..., h], weight [h] -> x * rsqrt(mean(x^2 over h) + eps) * weight (torch.nn.RMSNorm's values), x's dtype.

    torch path: a hand-written backward (fast_rms_norm.py); on CUDA torch's fused `rms_norm`."""
    if resolve_impl(impl, x) == "triton":
        return torch.nn.functional.rms_norm(x, x.shape[-1:], weight, eps)
    return fast_rms_norm.rms_norm(x, weight, eps)


def sinkhorn(logits: Tensor, iterations: int, eps: float, impl: str = "auto") -> Tensor:
    """[..., n, n] logits -> doubly-stochastic [..., n, n] (softmax rows + eps, column step, then row+column steps)."""
    if resolve_impl(impl, logits) == "triton":
        return _triton().sinkhorn(logits, iterations, eps)
    return fast_cpu.sinkhorn(logits, iterations, eps)


def mhc_aggregate(x: Tensor, h_pre: Tensor, n: int, impl: str = "auto") -> Tensor:
    """[..., n*h], h_pre [..., n] -> u [..., h] = sum_i h_pre[i] x_i (x's dtype)."""
    if resolve_impl(impl, x) == "triton":
        return _triton().mhc_aggregate(x, h_pre, n)
    return fast_cpu.mhc_aggregate(x, h_pre, n)


def mhc_post_res(x: Tensor, f: Tensor, h_post: Tensor, h_res: Tensor, n: int, impl: str = "auto") -> Tensor:
    """[..., n*h], f [..., h], h_post [..., n], h_res [..., n, n] -> [..., n*h]: x'_k = h_post[k] f + sum_j h_res[j,k] x_j."""
    if resolve_impl(impl, x) == "triton":
        return _triton().mhc_post_res(x, f, h_post, h_res, n)
    return fast_cpu.mhc_post_res(x, f, h_post, h_res, n)
