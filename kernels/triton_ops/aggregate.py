"""Weighted stream sum in Triton: u = sum_i w_i x_i, the mHC aggregate (w = h_pre) and the mean contraction (w = 1/n)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch


@triton.jit
def _weights(w_ptr, rows, i, vmask, n: tl.constexpr, UNIFORM: tl.constexpr):
    """The stream weights of BT tokens -> [BT, NP] fp32: w[t, i] from w_ptr [T, n], or 1/n when UNIFORM."""
    if UNIFORM:
        return tl.where(vmask, 1.0 / n, 0.0)
    return tl.load(w_ptr + rows[:, None] * n + i[None, :], mask=vmask, other=0.0).to(tl.float32)


@triton.jit
def _aggregate_fwd(
    x_ptr, w_ptr, u_ptr, T, h, n: tl.constexpr, UNIFORM: tl.constexpr,
    BT: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """u[t, d] = sum_i w[t, i] x[t, i, d] (w = 1/n when UNIFORM)."""
    rows, d, i, rmask = launch.token_tile(T, BT, NP, BH)
    vmask = rmask[:, None] & (i[None, :] < n)
    w = _weights(w_ptr, rows, i, vmask, n, UNIFORM)
    mask3 = vmask[:, :, None] & (d[None, None, :] < h)
    x = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * (n * h) + i[None, :, None] * h + d[None, None, :], mask=mask3, other=0.0)
    u = tl.sum(w[:, :, None] * x.to(tl.float32), axis=1)
    tl.store(u_ptr + rows[:, None].to(tl.int64) * h + d[None, :], u.to(u_ptr.dtype.element_ty), mask=rmask[:, None] & (d[None, :] < h))


@triton.jit
def _aggregate_bwd(
    x_ptr, w_ptr, du_ptr, dx_ptr, dw_ptr, T, h, n: tl.constexpr, UNIFORM: tl.constexpr,
    BT: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """dx[t, i, d] = w[t, i] du[t, d]; dw[t, i] = sum_d du[t, d] x[t, i, d] (skipped when UNIFORM)."""
    rows, i, rmask, vmask = launch.stream_tile(T, n, BT, NP)
    w = _weights(w_ptr, rows, i, vmask, n, UNIFORM)
    dw = tl.zeros((BT, NP), dtype=tl.float32)
    for d0 in range(0, h, BH):
        d = d0 + tl.arange(0, BH)
        du = tl.load(du_ptr + rows[:, None].to(tl.int64) * h + d[None, :], mask=rmask[:, None] & (d[None, :] < h), other=0.0)
        du = du.to(tl.float32)
        mask3 = vmask[:, :, None] & (d[None, None, :] < h)
        xoff = rows[:, None, None].to(tl.int64) * (n * h) + i[None, :, None] * h + d[None, None, :]
        tl.store(dx_ptr + xoff, (w[:, :, None] * du[:, None, :]).to(dx_ptr.dtype.element_ty), mask=mask3)
        if not UNIFORM:
            x = tl.load(x_ptr + xoff, mask=mask3, other=0.0).to(tl.float32)
            dw += tl.sum(x * du[:, None, :], axis=2)
    if not UNIFORM:
        tl.store(dw_ptr + rows[:, None] * n + i[None, :], dw, mask=vmask)


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w, n, uniform):
        T = x2.shape[0]
        h = x2.shape[1] // n
        u = torch.empty(T, h, device=x2.device, dtype=x2.dtype)
        BT, NP, BH = launch.stream_blocks(T, n, h)
        _aggregate_fwd[(triton.cdiv(T, BT), triton.cdiv(h, BH))](
            x2, x2 if uniform else w, u, T, h, n=n, UNIFORM=uniform, BT=BT, NP=NP, BH=BH
        )
        ctx.save_for_backward(x2, w)
        ctx.cfg = (n, uniform)
        return u

    @staticmethod
    def backward(ctx, du):
        x2, w = ctx.saved_tensors
        n, uniform = ctx.cfg
        T = x2.shape[0]
        h = x2.shape[1] // n
        dx = torch.empty_like(x2)
        dw = torch.empty(T, n, device=x2.device, dtype=torch.float32)
        BT, NP, BH = launch.stream_blocks(T, n, h)
        _aggregate_bwd[(triton.cdiv(T, BT),)](
            x2, x2 if uniform else w, du.contiguous(), dx, dw, T, h, n=n, UNIFORM=uniform, BT=BT, NP=NP, BH=BH
        )
        return dx, (None if uniform else dw.to(w.dtype)), None, None


def mhc_aggregate(x: Tensor, h_pre: Tensor, n: int) -> Tensor:
    """[..., n*h], h_pre [..., n] -> [..., h] in x's dtype."""
    launch.check_device(x, h_pre)
    K = launch.stream_width(x, n)
    lead = x.shape[:-1]
    if tuple(h_pre.shape) != (*lead, n):
        raise ValueError(f"mhc_aggregate: h_pre must be {(*lead, n)}, got {tuple(h_pre.shape)}")
    u = _Aggregate.apply(launch.flat(x, K, "x"), launch.flat(h_pre, n, "h_pre"), n, False)
    return u.view(*lead, K // n)


def average_output_contract(x: Tensor, n: int) -> Tensor:
    """[..., n*h] -> [..., h] = mean over streams, in x's dtype."""
    launch.check_device(x)
    K = launch.stream_width(x, n)
    x2 = launch.flat(x, K, "x")
    u = _Aggregate.apply(x2, x2.new_empty(0), n, True)
    return u.view(*x.shape[:-1], K // n)
