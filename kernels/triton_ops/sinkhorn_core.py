"""Sinkhorn in Triton: the jit core shared with the mHC coefficient kernels, and the standalone op.

`sk_forward` / `sk_backward` work on [BT, NP, NP] tiles (NP = next power of two >= n, `valid` masks the
padding). The backward recomputes the forward once, keeping only each step's n divisors in a small scratch,
then runs the steps in reverse: O(iterations), no forward state stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch


@triton.jit
def _sk_softmax_eps(z, valid, eps):
    """[BT, NP, NP] logits -> softmax over the last axis + eps (0 outside `valid`)."""
    z = tl.where(valid, z, -1.0e30)
    zmax = tl.max(z, axis=2)
    e = tl.where(valid, tl.exp(z - zmax[:, :, None]), 0.0)
    s = tl.sum(e, axis=2)
    s = tl.where(s > 0.0, s, 1.0)
    sm = e / s[:, :, None]
    return sm, tl.where(valid, sm + eps, 0.0)


@triton.jit
def _sk_step(p, valid, k, eps):
    """Normalisation step k: k == 0 or even -> columns, odd -> rows; each divided by (sum + eps)."""
    rs = tl.sum(p, axis=2)
    cs = tl.sum(p, axis=1)
    by_row = p / (rs[:, :, None] + eps)
    by_col = p / (cs[:, None, :] + eps)
    return tl.where(valid, tl.where((k % 2) == 1, by_row, by_col), 0.0)


@triton.jit
def sk_forward(z, valid, iterations, eps):
    """[BT, NP, NP] logits -> doubly-stochastic [BT, NP, NP] (softmax + eps, a column step, then row/column steps)."""
    _, p = _sk_softmax_eps(z, valid, eps)
    for k in range(0, 2 * iterations - 1):
        p = _sk_step(p, valid, k, eps)
    return p


@triton.jit
def sk_backward(z, g, valid, rows, rmask, scr_ptr, iterations, eps, NP: tl.constexpr):
    """d(sinkhorn)/d(logits) . g in O(steps): one forward recompute that writes each step's divisors
    (row or column sums + eps, NP floats per token and step) to the scratch `scr_ptr` [T, 2*iterations-1, NP],
    then the steps in reverse. Step k maps q -> y = q / c; its backward is dq = (g - sum(g * y)) / c along the
    normalised axis, and its input is recovered as q = y * c, so only the divisors are kept.
    """
    sm, p = _sk_softmax_eps(z, valid, eps)
    nsteps = 2 * iterations - 1
    i = tl.arange(0, NP)
    cmask = rmask[:, None] & (i[None, :] < NP)
    coff = rows[:, None].to(tl.int64) * (nsteps * NP) + i[None, :]
    for k in range(0, nsteps):
        by_row = (k % 2) == 1
        c = tl.where(by_row, tl.sum(p, axis=2), tl.sum(p, axis=1)) + eps  # [BT, NP]
        tl.store(scr_ptr + coff + k * NP, c, mask=cmask)
        p = tl.where(valid, tl.where(by_row, p / c[:, :, None], p / c[:, None, :]), 0.0)
    tl.debug_barrier()  # every thread reads back the divisors it wrote (same layout); the barrier makes it safe
    for kk in range(0, nsteps):
        k = nsteps - 1 - kk
        by_row = (k % 2) == 1
        c = tl.load(scr_ptr + coff + k * NP, mask=cmask, other=1.0)
        g_row = (g - tl.sum(g * p, axis=2)[:, :, None]) / c[:, :, None]
        g_col = (g - tl.sum(g * p, axis=1)[:, None, :]) / c[:, None, :]
        g = tl.where(valid, tl.where(by_row, g_row, g_col), 0.0)
        p = tl.where(valid, tl.where(by_row, p * c[:, :, None], p * c[:, None, :]), 0.0)  # input of step k
    dz = sm * (g - tl.sum(g * sm, axis=2)[:, :, None])
    return tl.where(valid, dz, 0.0)


@triton.jit
def _sinkhorn_fwd(z_ptr, out_ptr, T, n: tl.constexpr, iterations, eps, BT: tl.constexpr, NP: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    i = tl.arange(0, NP)
    valid = (rows[:, None, None] < T) & (i[None, :, None] < n) & (i[None, None, :] < n)
    off = rows[:, None, None].to(tl.int64) * (n * n) + i[None, :, None] * n + i[None, None, :]
    z = tl.load(z_ptr + off, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, sk_forward(z, valid, iterations, eps), mask=valid)


@triton.jit
def _sinkhorn_bwd(
    z_ptr, g_ptr, dz_ptr, scr_ptr, T, n: tl.constexpr, iterations, eps, BT: tl.constexpr, NP: tl.constexpr
):  # fmt: skip
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    i = tl.arange(0, NP)
    valid = (rows[:, None, None] < T) & (i[None, :, None] < n) & (i[None, None, :] < n)
    off = rows[:, None, None].to(tl.int64) * (n * n) + i[None, :, None] * n + i[None, None, :]
    z = tl.load(z_ptr + off, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + off, mask=valid, other=0.0).to(tl.float32)
    dz = sk_backward(z, g, valid, rows, rows < T, scr_ptr, iterations, eps, NP)
    tl.store(dz_ptr + off, dz, mask=valid)


def sk_scratch(T: int, n: int, iterations: int, device) -> Tensor:
    """Scratch for the Sinkhorn backward: each step's divisors, [T, 2*iterations-1, NP] fp32 (written, then read)."""
    return torch.empty(T, 2 * iterations - 1, launch.p2(n), device=device, dtype=torch.float32)


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, n, iterations, eps):
        T = z.shape[0]
        out = torch.empty(T, n, n, device=z.device, dtype=torch.float32)
        BT = launch.coef_block(T, n)
        _sinkhorn_fwd[(triton.cdiv(T, BT),)](z, out, T, n, iterations, eps, BT=BT, NP=launch.p2(n))
        ctx.save_for_backward(z)
        ctx.cfg = (n, iterations, eps)
        return out

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        n, iterations, eps = ctx.cfg
        T = z.shape[0]
        dz = torch.empty(T, n, n, device=z.device, dtype=torch.float32)
        BT = launch.coef_block(T, n)
        scr = sk_scratch(T, n, iterations, z.device)
        _sinkhorn_bwd[(triton.cdiv(T, BT),)](
            z, g.float().contiguous(), dz, scr, T, n, iterations, eps, BT=BT, NP=launch.p2(n)
        )
        return dz.to(z.dtype), None, None, None


def sinkhorn(logits: Tensor, iterations: int, eps: float) -> Tensor:
    """[..., n, n] -> [..., n, n] fp32; see reference.sinkhorn."""
    launch.check_device(logits)
    n = logits.shape[-1]
    if logits.dim() < 2 or logits.shape[-2] != n:
        raise ValueError(f"sinkhorn: logits must be [..., n, n], got {tuple(logits.shape)}")
    launch.check_iterations(iterations)
    lead = logits.shape[:-2]
    out = _Sinkhorn.apply(logits.reshape(-1, n, n).contiguous(), n, int(iterations), float(eps))
    return out.view(*lead, n, n)
