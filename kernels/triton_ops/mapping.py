"""mHC mappings in Triton: x [T, n*h] -> h_pre [T, n], h_post [T, n], h_res [T, n, n] (M = n*n + 2n mapping rows).

`projection._proj_sumsq_fwd` forms the raw x @ W^T and the RMS factor in one read of x; `_mhc_coef_fwd`
applies the RMS, gating, bias, sigmoids and Sinkhorn in one kernel. The backward (`_mhc_coef_bwd`)
recomputes the Sinkhorn iterations from the logits (see sinkhorn_core.sk_backward), then `projection._proj_bwd`
forms dx and dW.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .projection import projection, projection_bwd
from .sinkhorn_core import sk_backward, sk_forward, sk_scratch


@triton.jit
def _load_coef(mix_ptr, rstd_ptr, alpha_ptr, bias_ptr, rows, T, n: tl.constexpr, NP: tl.constexpr):
    M: tl.constexpr = n * n + 2 * n
    i = tl.arange(0, NP)
    rmask = rows < T
    vmask = rmask[:, None] & (i[None, :] < n)
    valid = rmask[:, None, None] & (i[None, :, None] < n) & (i[None, None, :] < n)
    r = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    a_pre = tl.load(alpha_ptr).to(tl.float32)
    a_post = tl.load(alpha_ptr + 1).to(tl.float32)
    a_res = tl.load(alpha_ptr + 2).to(tl.float32)
    mix_pre = tl.load(mix_ptr + rows[:, None] * M + i[None, :], mask=vmask, other=0.0)
    mix_post = tl.load(mix_ptr + rows[:, None] * M + n + i[None, :], mask=vmask, other=0.0)
    res_col = 2 * n + i[None, :, None] * n + i[None, None, :]
    mix_res = tl.load(mix_ptr + rows[:, None, None] * M + res_col, mask=valid, other=0.0)
    b_pre = tl.load(bias_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    b_post = tl.load(bias_ptr + n + i, mask=i < n, other=0.0).to(tl.float32)
    b_res = tl.load(bias_ptr + res_col, mask=valid, other=0.0).to(tl.float32)
    z_pre = mix_pre * r[:, None] * a_pre + b_pre[None, :]
    z_post = mix_post * r[:, None] * a_post + b_post[None, :]
    z_res = mix_res * r[:, None, None] * a_res + b_res
    return r, a_pre, a_post, a_res, mix_pre, mix_post, mix_res, z_pre, z_post, z_res, vmask, valid


@triton.jit
def _mhc_coef_fwd(
    mix_ptr, rstd_ptr, alpha_ptr, bias_ptr, pre_ptr, post_ptr, res_ptr, T, iterations, eps,
    n: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    i = tl.arange(0, NP)
    _, _, _, _, _, _, _, z_pre, z_post, z_res, vmask, valid = _load_coef(
        mix_ptr, rstd_ptr, alpha_ptr, bias_ptr, rows, T, n, NP
    )
    tl.store(pre_ptr + rows[:, None] * n + i[None, :], tl.sigmoid(z_pre) + eps, mask=vmask)
    tl.store(post_ptr + rows[:, None] * n + i[None, :], 2.0 * tl.sigmoid(z_post), mask=vmask)
    res_off = rows[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
    tl.store(res_ptr + res_off, sk_forward(z_res, valid, iterations, eps), mask=valid)


@triton.jit
def _mhc_coef_bwd(
    mix_ptr, rstd_ptr, alpha_ptr, bias_ptr, gpre_ptr, gpost_ptr, gres_ptr,
    dmix_ptr, dz_ptr, xcoef_ptr, dalpha_ptr, scr_ptr, T, K, iterations, eps,
    n: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    """-> dmix = dL/d(raw x @ W^T), dz = dL/d(logits) (bias grad per token), xcoef = dL/dr * dr/dx / x, dalpha per token."""
    M: tl.constexpr = n * n + 2 * n
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    i = tl.arange(0, NP)
    r, a_pre, a_post, a_res, mix_pre, mix_post, mix_res, z_pre, z_post, z_res, vmask, valid = _load_coef(
        mix_ptr, rstd_ptr, alpha_ptr, bias_ptr, rows, T, n, NP
    )
    g_pre = tl.load(gpre_ptr + rows[:, None] * n + i[None, :], mask=vmask, other=0.0)
    g_post = tl.load(gpost_ptr + rows[:, None] * n + i[None, :], mask=vmask, other=0.0)
    res_off = rows[:, None, None] * (n * n) + i[None, :, None] * n + i[None, None, :]
    g_res = tl.load(gres_ptr + res_off, mask=valid, other=0.0)
    s_pre = tl.sigmoid(z_pre)
    s_post = tl.sigmoid(z_post)
    dz_pre = tl.where(vmask, g_pre * s_pre * (1.0 - s_pre), 0.0)
    dz_post = tl.where(vmask, g_post * 2.0 * s_post * (1.0 - s_post), 0.0)
    dz_res = sk_backward(z_res, g_res, valid, rows, rows < T, scr_ptr, iterations, eps, NP)
    # alpha: d z / d alpha = mix * r ; bias: dz ; raw mix: dz * alpha * r ; r: sum dz * alpha * mix
    s_mix_pre = tl.sum(dz_pre * mix_pre, axis=1)
    s_mix_post = tl.sum(dz_post * mix_post, axis=1)
    s_mix_res = tl.sum(tl.sum(dz_res * mix_res, axis=2), axis=1)
    da_pre = s_mix_pre * r
    da_post = s_mix_post * r
    da_res = s_mix_res * r
    dr = s_mix_pre * a_pre + s_mix_post * a_post + s_mix_res * a_res
    rmask = rows < T
    tl.store(xcoef_ptr + rows, -dr * r * r * r / K, mask=rmask)
    tl.store(dalpha_ptr + rows * 3, da_pre, mask=rmask)
    tl.store(dalpha_ptr + rows * 3 + 1, da_post, mask=rmask)
    tl.store(dalpha_ptr + rows * 3 + 2, da_res, mask=rmask)
    base = rows[:, None] * M + i[None, :]
    tl.store(dz_ptr + base, dz_pre, mask=vmask)
    tl.store(dz_ptr + base + n, dz_post, mask=vmask)
    tl.store(dmix_ptr + base, dz_pre * a_pre * r[:, None], mask=vmask)
    tl.store(dmix_ptr + base + n, dz_post * a_post * r[:, None], mask=vmask)
    res_col = rows[:, None, None] * M + 2 * n + i[None, :, None] * n + i[None, None, :]
    tl.store(dz_ptr + res_col, dz_res, mask=valid)
    tl.store(dmix_ptr + res_col, dz_res * a_res * r[:, None, None], mask=valid)


class _MhcMappings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w, alpha, bias, n, iterations, eps):
        T, K = x2.shape
        mix, rstd = projection(x2, w, eps)
        h_pre = torch.empty(T, n, device=x2.device, dtype=torch.float32)
        h_post = torch.empty_like(h_pre)
        h_res = torch.empty(T, n, n, device=x2.device, dtype=torch.float32)
        BT = launch.coef_block(T, n)
        _mhc_coef_fwd[(triton.cdiv(T, BT),)](
            mix, rstd, alpha, bias, h_pre, h_post, h_res, T, iterations, eps, n=n, BT=BT, NP=launch.p2(n)
        )
        ctx.save_for_backward(x2, w, alpha, bias, mix, rstd)
        ctx.cfg = (n, iterations, eps)
        return h_pre, h_post, h_res

    @staticmethod
    def backward(ctx, g_pre, g_post, g_res):
        x2, w, alpha, bias, mix, rstd = ctx.saved_tensors
        n, iterations, eps = ctx.cfg
        T, K = x2.shape
        M = w.shape[0]
        dmix = torch.empty(T, M, device=x2.device, dtype=torch.float32)
        dz = torch.empty_like(dmix)
        xcoef = torch.empty(T, device=x2.device, dtype=torch.float32)
        dalpha = torch.empty(T, 3, device=x2.device, dtype=torch.float32)
        BT = launch.coef_block(T, n)
        _mhc_coef_bwd[(triton.cdiv(T, BT),)](
            mix, rstd, alpha, bias, g_pre.float().contiguous(), g_post.float().contiguous(), g_res.float().contiguous(),
            dmix, dz, xcoef, dalpha, sk_scratch(T, n, iterations, x2.device), T, K, iterations, eps,
            n=n, BT=BT, NP=launch.p2(n),
        )  # fmt: skip
        dx, dw = projection_bwd(x2, w, dmix, xcoef)
        return dx, dw.to(w.dtype), dalpha.sum(0).to(alpha.dtype), dz.sum(0).to(bias.dtype), None, None, None


def mhc_mappings(
    x: Tensor, proj_weight: Tensor, alpha: Tensor, bias: Tensor, n: int, iterations: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """[..., n*h] -> (h_pre [..., n], h_post [..., n], h_res [..., n, n]) fp32; see reference.mhc_mappings."""
    launch.check_device(x, proj_weight, alpha, bias)
    K = launch.stream_width(x, n)
    M = n * n + 2 * n
    if tuple(proj_weight.shape) != (M, K) or alpha.numel() != 3 or bias.numel() != M:
        raise ValueError(
            f"mhc_mappings: expected proj_weight [{M}, {K}], alpha [3], bias [{M}], got "
            f"{tuple(proj_weight.shape)}, {tuple(alpha.shape)}, {tuple(bias.shape)}"
        )
    launch.check_iterations(iterations)
    lead = x.shape[:-1]
    h_pre, h_post, h_res = _MhcMappings.apply(
        launch.flat(x, K, "x"), proj_weight.contiguous(), alpha.reshape(3).contiguous(), bias.reshape(M).contiguous(),
        n, int(iterations), float(eps),
    )  # fmt: skip
    return h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n)
