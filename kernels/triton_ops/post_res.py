"""mHC output in Triton: x'_k = h_post[k] f + sum_j h_res[j, k] x_j, forward and backward each in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch


@triton.jit
def _post_res_fwd(
    x_ptr, f_ptr, post_ptr, res_ptr, out_ptr, T, h, n: tl.constexpr,
    BT: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """out[t, k, d] = post[t, k] f[t, d] + sum_j res[t, j, k] x[t, j, d]."""
    rows, d, k, rmask = launch.token_tile(T, BT, NP, BH)
    dmask = d < h
    kmask = rmask[:, None] & (k[None, :] < n)
    post = tl.load(post_ptr + rows[:, None] * n + k[None, :], mask=kmask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + rows[:, None].to(tl.int64) * h + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    acc = post[:, :, None] * f.to(tl.float32)[:, None, :]
    xrow = rows[:, None].to(tl.int64) * (n * h)
    for j in tl.static_range(n):
        xj = tl.load(x_ptr + xrow + j * h + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        rj = tl.load(res_ptr + rows[:, None] * (n * n) + j * n + k[None, :], mask=kmask, other=0.0).to(tl.float32)
        acc += rj[:, :, None] * xj.to(tl.float32)[:, None, :]
    out_off = xrow[:, :, None] + k[None, :, None] * h + d[None, None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=kmask[:, :, None] & dmask[None, None, :])


@triton.jit
def _post_res_bwd(
    x_ptr, f_ptr, post_ptr, res_ptr, g_ptr, dx_ptr, df_ptr, dpost_ptr, dres_ptr, T, h, n: tl.constexpr,
    BT: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """One pass over (x, f, g): dx_j = sum_k res[j,k] g_k; df = sum_k post_k g_k; dpost_k = <g_k, f>; dres[j,k] = <x_j, g_k>."""
    rows, i, rmask, vmask = launch.stream_tile(T, n, BT, NP)
    valid = vmask[:, :, None] & (i[None, None, :] < n)
    post = tl.load(post_ptr + rows[:, None] * n + i[None, :], mask=vmask, other=0.0).to(tl.float32)
    res_off = rows[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
    res = tl.load(res_ptr + res_off, mask=valid, other=0.0).to(tl.float32)  # [BT, j, k]
    dpost = tl.zeros((BT, NP), dtype=tl.float32)
    dres = tl.zeros((BT, NP, NP), dtype=tl.float32)
    xrow = rows[:, None, None].to(tl.int64) * (n * h)
    for d0 in range(0, h, BH):
        d = d0 + tl.arange(0, BH)
        dmask = d < h
        mask3 = vmask[:, :, None] & dmask[None, None, :]
        off3 = xrow + i[None, :, None] * h + d[None, None, :]
        g = tl.load(g_ptr + off3, mask=mask3, other=0.0).to(tl.float32)  # [BT, k, BH]
        x = tl.load(x_ptr + off3, mask=mask3, other=0.0).to(tl.float32)  # [BT, j, BH]
        foff = rows[:, None].to(tl.int64) * h + d[None, :]
        fmask = rmask[:, None] & dmask[None, :]
        f = tl.load(f_ptr + foff, mask=fmask, other=0.0).to(tl.float32)
        tl.store(df_ptr + foff, tl.sum(post[:, :, None] * g, axis=1).to(df_ptr.dtype.element_ty), mask=fmask)
        dpost += tl.sum(g * f[:, None, :], axis=2)
        dres += tl.sum(x[:, :, None, :] * g[:, None, :, :], axis=3)
        dx = tl.sum(res[:, :, :, None] * g[:, None, :, :], axis=2)
        tl.store(dx_ptr + off3, dx.to(dx_ptr.dtype.element_ty), mask=mask3)
    tl.store(dpost_ptr + rows[:, None] * n + i[None, :], dpost, mask=vmask)
    tl.store(dres_ptr + res_off, dres, mask=valid)


class _PostRes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, f2, post, res, n):
        T = x2.shape[0]
        h = x2.shape[1] // n
        out = torch.empty_like(x2)
        BT, NP, BH = launch.stream_blocks(T, n, h)
        _post_res_fwd[(triton.cdiv(T, BT), triton.cdiv(h, BH))](x2, f2, post, res, out, T, h, n=n, BT=BT, NP=NP, BH=BH)
        ctx.save_for_backward(x2, f2, post, res)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, g):
        x2, f2, post, res = ctx.saved_tensors
        n = ctx.n
        T = x2.shape[0]
        h = x2.shape[1] // n
        dx = torch.empty_like(x2)
        df = torch.empty_like(f2)
        dpost = torch.empty(T, n, device=x2.device, dtype=torch.float32)
        dres = torch.empty(T, n, n, device=x2.device, dtype=torch.float32)
        meta = launch.post_res_bwd_meta(T, n, h)
        _post_res_bwd[(triton.cdiv(T, meta["BT"]),)](
            x2, f2, post, res, g.contiguous(), dx, df, dpost, dres, T, h, n=n, **meta
        )
        return dx, df, dpost.to(post.dtype), dres.to(res.dtype), None


def mhc_post_res(x: Tensor, f: Tensor, h_post: Tensor, h_res: Tensor, n: int) -> Tensor:
    """[..., n*h], f [..., h], h_post [..., n], h_res [..., n, n] -> [..., n*h] in x's dtype."""
    launch.check_device(x, f, h_post, h_res)
    K = launch.stream_width(x, n)
    lead = x.shape[:-1]
    h = K // n
    for name, t, want in (("f", f, (*lead, h)), ("h_post", h_post, (*lead, n)), ("h_res", h_res, (*lead, n, n))):
        if tuple(t.shape) != want:
            raise ValueError(f"mhc_post_res: {name} must be {want}, got {tuple(t.shape)}")
    if f.dtype != x.dtype:
        f = f.to(x.dtype)
    out = _PostRes.apply(
        launch.flat(x, K, "x"), launch.flat(f, h, "f"), launch.flat(h_post, n, "h_post"),
        h_res.reshape(-1, n, n).contiguous(), n,
    )  # fmt: skip
    return out.view(*lead, K)
