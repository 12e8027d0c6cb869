"""The projection x @ W^T with the RMS factor, forward and backward, shared by mHC mappings and the contraction.

T tokens, K = n*h flattened width, M rows of W (n*n + 2n for the mHC mappings, n for the contraction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch


@triton.jit
def _proj_sumsq_fwd(
    x_ptr, w_ptr, mix_ptr, rstd_ptr, T, K, M, eps,
    BT: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """mix[T, M] = x @ W^T (raw) and rstd[T] = rsqrt(mean(x^2) + eps), one read of x."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    m = tl.arange(0, BM)
    mmask = m < M
    acc = tl.zeros((BT, BM), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        xt = xt.to(tl.float32)
        wt = tl.load(w_ptr + m[None, :] * K + kk[:, None], mask=mmask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(xt, wt.to(tl.float32), acc, input_precision=PREC)
        ss += tl.sum(xt * xt, axis=1)
    tl.store(mix_ptr + rows[:, None] * M + m[None, :], acc, mask=rmask[:, None] & mmask[None, :])
    tl.store(rstd_ptr + rows, 1.0 / tl.sqrt(ss / K + eps), mask=rmask)


@triton.jit
def _proj_bwd(
    x_ptr, w_ptr, dmix_ptr, xcoef_ptr, pre_ptr, dy_ptr, dx_ptr, dw_ptr, T, K, M, h, n, tokens_per_split,
    HAS_COMBINE: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr,
    HAS_DX: tl.constexpr = True,
):  # fmt: skip
    """Columns block x token split: dx = dmix @ W + xcoef * x [+ pre[stream] * dy] (when HAS_DX);
    dW_partial[split] = dmix^T x."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    kk = pid_n * BN + tl.arange(0, BN)
    kmask = kk < K
    m = tl.arange(0, BM)
    mmask = m < M
    w = tl.load(w_ptr + m[:, None] * K + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    dw = tl.zeros((BM, BN), dtype=tl.float32)
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)
    for t0 in range(t_start, t_end, BT):
        rows = t0 + tl.arange(0, BT)
        rmask = rows < t_end
        mask2 = rmask[:, None] & kmask[None, :]
        xoff = rows[:, None].to(tl.int64) * K + kk[None, :]
        xt = tl.load(x_ptr + xoff, mask=mask2, other=0.0).to(tl.float32)
        dm = tl.load(dmix_ptr + rows[:, None] * M + m[None, :], mask=rmask[:, None] & mmask[None, :], other=0.0)
        if HAS_DX:
            c = tl.load(xcoef_ptr + rows, mask=rmask, other=0.0)
            dx = tl.dot(dm, w, input_precision=PREC) + c[:, None] * xt
            if HAS_COMBINE:
                stream = kk // h
                pre = tl.load(pre_ptr + rows[:, None] * n + stream[None, :], mask=mask2, other=0.0)
                dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * h + (kk - stream * h)[None, :], mask=mask2, other=0.0)
                dx += pre * dy.to(tl.float32)
            tl.store(dx_ptr + xoff, dx.to(dx_ptr.dtype.element_ty), mask=mask2)
        dw = tl.dot(tl.trans(dm), xt, dw, input_precision=PREC)
    tl.store(dw_ptr + pid_s * M * K + m[:, None] * K + kk[None, :], dw, mask=mmask[:, None] & kmask[None, :])


def projection(x2: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x2 [T, K], w [M, K] -> raw mix [T, M] fp32, rstd [T] fp32."""
    T, K = x2.shape
    M = w.shape[0]
    mix = torch.empty(T, M, device=x2.device, dtype=torch.float32)
    rstd = torch.empty(T, device=x2.device, dtype=torch.float32)
    meta = launch.proj_fwd_meta(T, K, M, x2.element_size())
    _proj_sumsq_fwd[(triton.cdiv(T, meta["BT"]),)](x2, w, mix, rstd, T, K, M, eps, **meta)
    return mix, rstd


def projection_bwd(
    x2: Tensor, w: Tensor, dmix: Tensor, xcoef: Tensor | None, pre: Tensor | None = None, dy: Tensor | None = None,
    h: int = 1,
) -> tuple[Tensor | None, Tensor]:
    """-> dx [T, K] (x2's dtype), dW [M, K] fp32 (the contraction adds pre[stream] * dy to dx).

    xcoef None: dW only (dx is None), for callers that formed dx themselves."""
    T, K = x2.shape
    M = w.shape[0]
    meta = launch.proj_bwd_meta(T, K, M, x2.element_size())
    BT = meta["BT"]
    splits = max(1, min(launch.PROJ_BWD_SPLITS, triton.cdiv(T, BT)))
    per_split = triton.cdiv(triton.cdiv(T, splits), BT) * BT
    splits = triton.cdiv(T, per_split)
    has_dx = xcoef is not None
    dx = torch.empty_like(x2) if has_dx else None
    dw = torch.empty(splits, M, K, device=x2.device, dtype=torch.float32)
    combine = pre is not None
    _proj_bwd[(triton.cdiv(K, meta["BN"]), splits)](
        x2, w, dmix, xcoef if has_dx else dmix, pre if combine else dmix, dy if combine else dmix,
        dx if has_dx else x2, dw, T, K, M, h, pre.shape[1] if combine else 1, per_split,
        HAS_COMBINE=combine, HAS_DX=has_dx, **meta,
    )  # fmt: skip
    return dx, dw.sum(0)
