"""Learned output contraction in Triton: [T, n*h] -> [T, h], y = sum_i pre_i x_i, pre = sigmoid(x @ fn^T r scale + base) + eps.

Two forward paths: `_contract_fwd_row` keeps whole token rows on chip (one [BT, HP] tile per stream, held as a
tuple) and reads x once; `_contract_fwd` is the two-pass fallback for rows too wide for that (launch.contract_row_meta
decides). Backward: `_contract_bwd_row` (rows on chip: dx from one read of x and dy) + `projection._proj_bwd`
without dx (dhead_fn), or for wide rows `_contract_bwd_coef` + `projection._proj_bwd`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .projection import projection_bwd


@triton.jit
def _contract_fwd(
    x_ptr, fn_ptr, base_ptr, scale_ptr, y_ptr, mix_ptr, rstd_ptr, pre_ptr, T, h, eps,
    n: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per token block: mix = x @ fn^T and sum(x^2) (pass 1), pre = sigmoid(mix r scale + base) + eps, y = sum_i pre_i x_i (pass 2)."""
    K = n * h
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    m = tl.arange(0, BM)
    mmask = m < n
    xrow = rows[:, None].to(tl.int64) * K
    acc = tl.zeros((BT, BM), dtype=tl.float32)
    ss = tl.zeros((BT,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        xt = tl.load(x_ptr + xrow + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        wt = tl.load(fn_ptr + m[None, :] * K + kk[:, None], mask=mmask[None, :] & kmask[:, None], other=0.0)
        if BT >= 16:  # tl.dot needs every dim >= 16; smaller token blocks (gpu_check.py times them) use a sum
            acc = tl.dot(xt, wt.to(tl.float32), acc, input_precision=PREC)
        else:
            acc += tl.sum(xt[:, :, None] * wt.to(tl.float32)[None, :, :], axis=1)
        ss += tl.sum(xt * xt, axis=1)
    r = 1.0 / tl.sqrt(ss / K + eps)
    base = tl.load(base_ptr + m, mask=mmask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr).to(tl.float32)
    pre = tl.where(mmask[None, :], tl.sigmoid(acc * r[:, None] * scale + base[None, :]) + eps, 0.0)
    omask = rmask[:, None] & mmask[None, :]
    tl.store(mix_ptr + rows[:, None] * n + m[None, :], acc, mask=omask)
    tl.store(pre_ptr + rows[:, None] * n + m[None, :], pre, mask=omask)
    tl.store(rstd_ptr + rows, r, mask=rmask)
    for d0 in range(0, h, BH):
        d = d0 + tl.arange(0, BH)
        dmask = rmask[:, None] & (d[None, :] < h)
        y = tl.zeros((BT, BH), dtype=tl.float32)
        for i in tl.static_range(n):
            pre_i = tl.sum(tl.where(m[None, :] == i, pre, 0.0), axis=1)
            xi = tl.load(x_ptr + xrow + i * h + d[None, :], mask=dmask, other=0.0).to(tl.float32)
            y += pre_i[:, None] * xi
        tl.store(y_ptr + rows[:, None].to(tl.int64) * h + d[None, :], y.to(y_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _row_tile(T, K, h, BT: tl.constexpr, NP: tl.constexpr, HP: tl.constexpr):
    """BT whole token rows -> rows, streams [NP], rows < T, d [HP], d < h, the [BT, HP] mask, row offsets [BT, 1]."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    i = tl.arange(0, NP)
    d = tl.arange(0, HP)
    dmask = d < h
    return rows, i, rmask, d, dmask, rmask[:, None] & dmask[None, :], rows[:, None].to(tl.int64) * K


@triton.jit
def _row_stream(x_ptr, xrow, j: tl.constexpr, h, d, ymask):
    """Stream j of BT token rows -> [BT, HP] fp32."""
    return tl.load(x_ptr + xrow + j * h + d[None, :], mask=ymask, other=0.0).to(tl.float32)


@triton.jit
def _row_dot(xj, fn_ptr, m: tl.constexpr, j: tl.constexpr, K, h, d, dmask):
    """<x_j, head_fn[m, j*h:(j+1)*h]> per token -> [BT] (the head_fn slice is loaded [HP], from L2)."""
    w = tl.load(fn_ptr + m * K + j * h + d, mask=dmask, other=0.0).to(tl.float32)
    return tl.sum(xj * w[None, :], axis=1)


@triton.jit
def _row_mix(fn_ptr, m: tl.constexpr, K, h, d, dmask, xs, n: tl.constexpr):
    """Row m of x @ head_fn^T per token -> [BT], summed stream by stream over the n [BT, HP] tiles `xs`."""
    acc = _row_dot(xs[0], fn_ptr, m, 0, K, h, d, dmask)
    for j in tl.static_range(1, n):
        acc += _row_dot(xs[j], fn_ptr, m, j, K, h, d, dmask)
    return acc


@triton.jit
def _pick(v, i, j: tl.constexpr):
    """Column j of [BT, NP] -> [BT, 1]."""
    return tl.sum(tl.where(i[None, :] == j, v, 0.0), axis=1)[:, None]


@triton.jit
def _contract_fwd_row(
    x_ptr, fn_ptr, base_ptr, scale_ptr, y_ptr, mix_ptr, rstd_ptr, pre_ptr, T, h, eps,
    n: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, HP: tl.constexpr,
):  # fmt: skip
    """One read of x: BT whole token rows stay in registers, one [BT, HP] tensor per stream (a tuple of n), while
    mix = x @ fn^T, sum(x^2), pre = sigmoid(mix r scale + base) + eps and y = sum_i pre_i x_i are formed.
    head_fn is read (from L2) in [HP] slices, one per (row m, stream j), so only x is held whole."""
    K = n * h
    rows, i, rmask, d, dmask, ymask, xrow = _row_tile(T, K, h, BT, NP, HP)
    x0 = _row_stream(x_ptr, xrow, 0, h, d, ymask)
    ss = tl.sum(x0 * x0, axis=1)
    xs = (x0,)
    for j in tl.static_range(1, n):
        xj = _row_stream(x_ptr, xrow, j, h, d, ymask)
        ss += tl.sum(xj * xj, axis=1)
        xs = xs + (xj,)
    r = 1.0 / tl.sqrt(ss / K + eps)  # [BT]
    mix = tl.zeros((BT, NP), dtype=tl.float32)
    for m in tl.static_range(n):
        mm = _row_mix(fn_ptr, m, K, h, d, dmask, xs, n)
        mix = tl.where(i[None, :] == m, mm[:, None], mix)
    base = tl.load(base_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr).to(tl.float32)
    vmask = rmask[:, None] & (i[None, :] < n)
    pre = tl.where(vmask, tl.sigmoid(mix * r[:, None] * scale + base[None, :]) + eps, 0.0)
    y = _pick(pre, i, 0) * xs[0]
    for j in tl.static_range(1, n):
        y += _pick(pre, i, j) * xs[j]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * h + d[None, :], y.to(y_ptr.dtype.element_ty), mask=ymask)
    tl.store(mix_ptr + rows[:, None] * n + i[None, :], mix, mask=vmask)
    tl.store(pre_ptr + rows[:, None] * n + i[None, :], pre, mask=vmask)
    tl.store(rstd_ptr + rows, r, mask=rmask)


@triton.jit
def _row_dx(xj, dy, pre_j, c, dmix, i, fn_ptr, j: tl.constexpr, K, h, d, dmask, n: tl.constexpr):
    """dx_j = sum_m dmix[m] head_fn[m, j-slice] + c x_j + pre_j dy -> [BT, HP]."""
    acc = c[:, None] * xj + pre_j * dy
    for m in range(0, n):  # a runtime loop: the head_fn slices are not all hoisted (register pressure)
        w = tl.load(fn_ptr + m * K + j * h + d, mask=dmask, other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(i[None, :] == m, dmix, 0.0), axis=1)[:, None] * w[None, :]
    return acc


@triton.jit
def _contract_coef_bwd(
    dpre, rows, rmask, i, n: tl.constexpr, K, eps, mix_ptr, pre_ptr, rstd_ptr, scale_ptr, dz_ptr, dmix_ptr, dscale_ptr
):  # fmt: skip
    """The sigmoid / RMS chain from dpre [BT, NP]: stores dz (= dbase per token), dmix and dscale [BT];
    returns (pre, dmix, xcoef [BT]) with dL/dr = sum_i dz_i mix_i scale and dr/dx = -r^3 x / K (dx += xcoef x)."""
    vmask = rmask[:, None] & (i[None, :] < n)
    off = rows[:, None] * n + i[None, :]
    mix = tl.load(mix_ptr + off, mask=vmask, other=0.0)
    pre = tl.load(pre_ptr + off, mask=vmask, other=0.0)
    r = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    scale = tl.load(scale_ptr).to(tl.float32)
    s = pre - eps
    dz = tl.where(vmask, dpre * s * (1.0 - s), 0.0)
    dscale = tl.sum(dz * mix, axis=1) * r
    dmix = dz * scale * r[:, None]
    xcoef = -(dscale * scale) * r * r / K
    tl.store(dz_ptr + off, dz, mask=vmask)
    tl.store(dmix_ptr + off, dmix, mask=vmask)
    tl.store(dscale_ptr + rows, dscale, mask=rmask)
    return pre, dmix, xcoef


@triton.jit
def _contract_bwd_row(
    x_ptr, dy_ptr, fn_ptr, mix_ptr, rstd_ptr, pre_ptr, scale_ptr, dx_ptr, dmix_ptr, dz_ptr, dscale_ptr, T, h, eps,
    n: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, HP: tl.constexpr,
):  # fmt: skip
    """One read of x and of dy: with whole rows on chip (one [BT, HP] tensor per stream), dpre_i = <dy, x_i>,
    the sigmoid / RMS chain (dmix, dz = dbase per token, dscale per token) and
    dx_i = sum_m dmix[m] head_fn[m, i-slice] - (dL/dr) r^3 x_i / K + pre_i dy. dhead_fn = dmix^T x is a
    reduction over tokens and is left to `_proj_bwd` (HAS_DX=False)."""
    K = n * h
    rows, i, rmask, d, dmask, ymask, xrow = _row_tile(T, K, h, BT, NP, HP)
    dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * h + d[None, :], mask=ymask, other=0.0).to(tl.float32)
    xs = ()
    dpre = tl.zeros((BT, NP), dtype=tl.float32)
    for j in tl.static_range(n):
        xj = _row_stream(x_ptr, xrow, j, h, d, ymask)
        dpre = tl.where(i[None, :] == j, tl.sum(xj * dy, axis=1)[:, None], dpre)
        xs = xs + (xj,)
    pre, dmix, c = _contract_coef_bwd(
        dpre, rows, rmask, i, n, K, eps, mix_ptr, pre_ptr, rstd_ptr, scale_ptr, dz_ptr, dmix_ptr, dscale_ptr
    )
    dxp = dx_ptr + xrow + d[None, :]
    for j in tl.static_range(n):
        dxj = _row_dx(xs[j], dy, _pick(pre, i, j), c, dmix, i, fn_ptr, j, K, h, d, dmask, n)
        tl.store(dxp + j * h, dxj.to(dx_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _contract_bwd_coef(
    x_ptr, dy_ptr, mix_ptr, rstd_ptr, pre_ptr, scale_ptr, dmix_ptr, dz_ptr, xcoef_ptr, dscale_ptr, T, h, eps,
    n: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """dpre_i = <dy, x_i> over h, then the sigmoid / RMS chain: dmix, dz (= dbase per token), xcoef, dscale per token."""
    K = n * h
    rows, i, rmask, vmask = launch.stream_tile(T, n, BT, NP)
    dpre = tl.zeros((BT, NP), dtype=tl.float32)
    for d0 in range(0, h, BH):
        d = d0 + tl.arange(0, BH)
        dmask = d < h
        dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * h + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        mask3 = vmask[:, :, None] & dmask[None, None, :]
        x = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * K + i[None, :, None] * h + d[None, None, :], mask=mask3, other=0.0)
        dpre += tl.sum(x.to(tl.float32) * dy.to(tl.float32)[:, None, :], axis=2)
    _, _, xcoef = _contract_coef_bwd(
        dpre, rows, rmask, i, n, K, eps, mix_ptr, pre_ptr, rstd_ptr, scale_ptr, dz_ptr, dmix_ptr, dscale_ptr
    )
    tl.store(xcoef_ptr + rows, xcoef, mask=rmask)


class _LearnedContract(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, head_fn, base, scale, n, eps):
        T, K = x2.shape
        h = K // n
        y = torch.empty(T, h, device=x2.device, dtype=x2.dtype)
        mix = torch.empty(T, n, device=x2.device, dtype=torch.float32)
        pre = torch.empty_like(mix)
        rstd = torch.empty(T, device=x2.device, dtype=torch.float32)
        meta = launch.contract_row_meta(T, n, h)
        kernel = _contract_fwd_row
        if meta is None:
            meta, kernel = launch.contract_fwd_meta(T, n, h), _contract_fwd
        kernel[(triton.cdiv(T, meta["BT"]),)](x2, head_fn, base, scale, y, mix, rstd, pre, T, h, eps, n=n, **meta)
        ctx.save_for_backward(x2, head_fn, scale, mix, rstd, pre)
        ctx.cfg = (n, eps, base.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, head_fn, scale, mix, rstd, pre = ctx.saved_tensors
        n, eps, base_dtype = ctx.cfg
        T, K = x2.shape
        h = K // n
        dy = dy.contiguous()
        dmix = torch.empty(T, n, device=x2.device, dtype=torch.float32)
        dz = torch.empty_like(dmix)
        xcoef = torch.empty(T, device=x2.device, dtype=torch.float32)
        dscale = torch.empty(T, device=x2.device, dtype=torch.float32)
        row = launch.contract_bwd_row_meta(T, n, h)
        if row is not None:  # one read of x and dy for dx; dhead_fn (a sum over tokens) reads x once more
            dx = torch.empty_like(x2)
            _contract_bwd_row[(triton.cdiv(T, row["BT"]),)](
                x2, dy, head_fn, mix, rstd, pre, scale, dx, dmix, dz, dscale, T, h, eps, n=n, **row
            )
            _, dfn = projection_bwd(x2, head_fn, dmix, None)
        else:
            BT, NP, BH = launch.stream_blocks(T, n, h)
            _contract_bwd_coef[(triton.cdiv(T, BT),)](
                x2, dy, mix, rstd, pre, scale, dmix, dz, xcoef, dscale, T, h, eps, n=n, BT=BT, NP=NP, BH=BH
            )
            dx, dfn = projection_bwd(x2, head_fn, dmix, xcoef, pre=pre, dy=dy, h=h)
        return dx, dfn.to(head_fn.dtype), dz.sum(0).to(base_dtype), dscale.sum().reshape(1).to(scale.dtype), None, None


def learned_output_contract(x: Tensor, head_fn: Tensor, base: Tensor, scale: Tensor, n: int, eps: float) -> Tensor:
    """[..., n*h] -> [..., h] in x's dtype; see reference.learned_output_contract."""
    launch.check_device(x, head_fn, base, scale)
    K = launch.stream_width(x, n)
    if tuple(head_fn.shape) != (n, K) or base.numel() != n or scale.numel() != 1:
        raise ValueError(
            f"learned_output_contract: expected head_fn [{n}, {K}], base [{n}], scale [1], got "
            f"{tuple(head_fn.shape)}, {tuple(base.shape)}, {tuple(scale.shape)}"
        )
    y = _LearnedContract.apply(
        launch.flat(x, K, "x"), head_fn.contiguous(), base.reshape(n).contiguous(), scale.reshape(1).contiguous(),
        n, float(eps),
    )  # fmt: skip
    return y.view(*x.shape[:-1], K // n)
