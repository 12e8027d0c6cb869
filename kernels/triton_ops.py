"""Fused Triton kernels for the mHC and output-contraction ops, each wrapped in a torch.autograd.Function.

Kernels (T tokens, K = n*h flattened width, M = n*n + 2n mapping rows; every kernel computes in fp32):
- `_proj_sumsq_fwd`: one pass over x -> raw x @ W^T [T, M] and rsqrt(mean(x^2) + eps) [T]
  (the RMS is applied after the matmul, in the coefficient kernel);
- `_mhc_coef_fwd` / `_mhc_coef_bwd`: gating, bias, sigmoids and Sinkhorn in one kernel; the backward
  recomputes the Sinkhorn iterations once from the logits (keeping only each step's n divisors in a small
  scratch) and then runs the steps in reverse: O(iterations), no forward state stored;
- `_proj_bwd`: dx = dmix @ W + c * x (+ the contraction's pre * dy) and per-split partial dW = dmix^T x;
- `_sinkhorn_fwd` / `_sinkhorn_bwd`: the standalone Sinkhorn op;
- `_aggregate_fwd` / `_aggregate_bwd`: u = sum_i w_i x_i (also the mean contraction with w = 1/n);
- `_post_res_fwd` / `_post_res_bwd`: x'_k = h_post[k] f + sum_j h_res[j, k] x_j in one pass;
- `_contract_fwd_row` / `_contract_fwd` / `_contract_bwd_coef`: learned contraction (projection, RMS,
  sigmoid and the weighted stream sum in one kernel; `_contract_fwd_row` keeps whole token rows on chip
  and reads x once, `_contract_fwd` is the two-pass fallback for rows too wide for that); its backward is
  `_contract_bwd_row` (rows on chip: dx from one read of x and dy) + `_proj_bwd` without dx (dhead_fn), or
  for wide rows `_contract_bwd_coef` + `_proj_bwd`.
Under TRITON_INTERPRET=1 (set before this module is imported) they run on CPU tensors.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton without knobs (< 3.4): it reads the variable itself
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

# Block-size caps (powers of two). Tests lower them to exercise multi-block loops on tiny shapes.
MAX_BLOCK_T = 64
MAX_BLOCK_K = 128
MAX_BLOCK_H = 256
PROJ_BWD_SPLITS = 8
MIN_PROGRAMS = 512  # token blocks shrink (or stop growing) to keep at least this many programs
# Learned contraction forward: token rows of up to this many (padded) elements are held on chip whole,
# so x is read once (`_contract_fwd_row`); wider rows use the two-pass `_contract_fwd`. 0 forces two-pass.
CONTRACT_ROW_MAX_ELEMS = 32768
CONTRACT_ROW_PER_THREAD = 64  # row elements per thread (sets num_warps)
CONTRACT_ROW_MIN_ELEMS = 8192  # narrow rows: several tokens per program up to this many elements
CONTRACT_BWD_ROW_MAX_ELEMS = 16384  # backward with rows on chip (it holds more per element than the forward)
# Two-pass fallback: tokens per program. Larger amortises the head_fn reads (L2), smaller keeps the block
# that pass 2 re-reads (BT * n*h elements) small enough to still be in L1/L2. Untimed; gpu_check.py sweeps it.
CONTRACT_TWO_PASS_BT = 16
DOT_PRECISION = "tf32x3"  # ~fp32 accuracy on tensor cores; the interpreter computes in fp32 anyway

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------ helpers


def _p2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def _check_device(*tensors: Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"triton kernels on {dev.type} tensors need TRITON_INTERPRET=1 set before dsv4cli.kernels.triton_ops "
            "is first imported"
        )
    for t in tensors:
        if t.dtype not in _SUPPORTED:
            raise ValueError(f"triton kernels take float32/bfloat16/float16 tensors, got {t.dtype} (use impl='torch')")


def _flat(x: Tensor, width: int, name: str) -> Tensor:
    """[..., width] -> contiguous [T, width] (copies non-contiguous inputs)."""
    if x.shape[-1] != width:
        raise ValueError(f"{name}: last dim must be {width}, got shape {tuple(x.shape)}")
    return x.reshape(-1, width).contiguous()


def _block_t(T: int, lo: int = 1) -> int:
    """Token block: the largest power of two <= MAX_BLOCK_T that still gives >= MIN_PROGRAMS programs (else lo)."""
    bt = max(lo, min(_p2(T), MAX_BLOCK_T))
    while bt > lo and triton.cdiv(T, bt) < MIN_PROGRAMS:
        bt //= 2
    return bt


# ------------------------------------------------------------------------------------------ Sinkhorn core


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
def _sk_forward(z, valid, iterations, eps):
    _, p = _sk_softmax_eps(z, valid, eps)
    for k in range(0, 2 * iterations - 1):
        p = _sk_step(p, valid, k, eps)
    return p


@triton.jit
def _sk_backward(z, g, valid, rows, rmask, scr_ptr, iterations, eps, NP: tl.constexpr):
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
    tl.store(out_ptr + off, _sk_forward(z, valid, iterations, eps), mask=valid)


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
    dz = _sk_backward(z, g, valid, rows, rows < T, scr_ptr, iterations, eps, NP)
    tl.store(dz_ptr + off, dz, mask=valid)


# ------------------------------------------------------------------------------------------ projection


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


def proj_fwd_meta(T: int, K: int, M: int, elem_bytes: int = 2) -> dict:
    """Constexprs and launch options of `_proj_sumsq_fwd` (chosen so ptxas reports no spills on sm_90)."""
    BM = max(16, _p2(M))
    BK = max(16, min(_p2(K), MAX_BLOCK_K, 64 if BM <= 32 else 32))
    return dict(BT=_block_t(T, 16), BK=BK, BM=BM, PREC=DOT_PRECISION, num_warps=8, num_stages=3)


def proj_bwd_meta(T: int, K: int, M: int, elem_bytes: int = 2) -> dict:
    """Constexprs and launch options of `_proj_bwd` (no spills on sm_90 for n <= 8, bf16 and fp32)."""
    BM = max(16, _p2(M))
    if BM <= 32:
        bt, bn = (64 if elem_bytes <= 2 else 32), 64
    else:
        bt, bn = 16, (64 if elem_bytes <= 2 else 32)
    BN = max(16, min(_p2(K), MAX_BLOCK_K, bn))
    return dict(BT=min(_block_t(T, 16), bt), BN=BN, BM=BM, PREC=DOT_PRECISION, num_warps=8, num_stages=3)


def _projection(x2: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x2 [T, K], w [M, K] -> raw mix [T, M] fp32, rstd [T] fp32."""
    T, K = x2.shape
    M = w.shape[0]
    mix = torch.empty(T, M, device=x2.device, dtype=torch.float32)
    rstd = torch.empty(T, device=x2.device, dtype=torch.float32)
    meta = proj_fwd_meta(T, K, M, x2.element_size())
    _proj_sumsq_fwd[(triton.cdiv(T, meta["BT"]),)](x2, w, mix, rstd, T, K, M, eps, **meta)
    return mix, rstd


def _projection_bwd(
    x2: Tensor, w: Tensor, dmix: Tensor, xcoef: Tensor | None, pre: Tensor | None = None, dy: Tensor | None = None,
    h: int = 1,
) -> tuple[Tensor | None, Tensor]:
    """-> dx [T, K] (x2's dtype), dW [M, K] fp32 (the contraction adds pre[stream] * dy to dx).

    xcoef None: dW only (dx is None), for callers that formed dx themselves."""
    T, K = x2.shape
    M = w.shape[0]
    meta = proj_bwd_meta(T, K, M, x2.element_size())
    BT = meta["BT"]
    splits = max(1, min(PROJ_BWD_SPLITS, triton.cdiv(T, BT)))
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


# ------------------------------------------------------------------------------------------ mHC coefficients


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
    tl.store(res_ptr + res_off, _sk_forward(z_res, valid, iterations, eps), mask=valid)


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
    dz_res = _sk_backward(z_res, g_res, valid, rows, rows < T, scr_ptr, iterations, eps, NP)
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


def _sk_scratch(T: int, n: int, iterations: int, device) -> Tensor:
    """Scratch for the Sinkhorn backward: each step's divisors, [T, 2*iterations-1, NP] fp32 (written, then read)."""
    return torch.empty(T, 2 * iterations - 1, _p2(n), device=device, dtype=torch.float32)


def _coef_block(T: int, n: int) -> int:
    return max(1, min(_p2(T), MAX_BLOCK_T, 256 // (_p2(n) ** 2) or 1))


class _MhcMappings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w, alpha, bias, n, iterations, eps):
        T, K = x2.shape
        mix, rstd = _projection(x2, w, eps)
        h_pre = torch.empty(T, n, device=x2.device, dtype=torch.float32)
        h_post = torch.empty_like(h_pre)
        h_res = torch.empty(T, n, n, device=x2.device, dtype=torch.float32)
        BT = _coef_block(T, n)
        _mhc_coef_fwd[(triton.cdiv(T, BT),)](
            mix, rstd, alpha, bias, h_pre, h_post, h_res, T, iterations, eps, n=n, BT=BT, NP=_p2(n)
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
        BT = _coef_block(T, n)
        _mhc_coef_bwd[(triton.cdiv(T, BT),)](
            mix, rstd, alpha, bias, g_pre.float().contiguous(), g_post.float().contiguous(), g_res.float().contiguous(),
            dmix, dz, xcoef, dalpha, _sk_scratch(T, n, iterations, x2.device), T, K, iterations, eps,
            n=n, BT=BT, NP=_p2(n),
        )  # fmt: skip
        dx, dw = _projection_bwd(x2, w, dmix, xcoef)
        return dx, dw.to(w.dtype), dalpha.sum(0).to(alpha.dtype), dz.sum(0).to(bias.dtype), None, None, None


def mhc_mappings(x, proj_weight, alpha, bias, n, iterations, eps):
    """[..., n*h] -> (h_pre [..., n], h_post [..., n], h_res [..., n, n]) fp32; see reference.mhc_mappings."""
    _check_device(x, proj_weight, alpha, bias)
    K = x.shape[-1]
    if K % n:
        raise ValueError(f"last dim {K} of x is not a multiple of n={n}")
    M = n * n + 2 * n
    if tuple(proj_weight.shape) != (M, K) or alpha.numel() != 3 or bias.numel() != M:
        raise ValueError(
            f"mhc_mappings: expected proj_weight [{M}, {K}], alpha [3], bias [{M}], got "
            f"{tuple(proj_weight.shape)}, {tuple(alpha.shape)}, {tuple(bias.shape)}"
        )
    if iterations < 1:
        raise ValueError(f"sinkhorn iterations must be >= 1, got {iterations}")
    lead = x.shape[:-1]
    h_pre, h_post, h_res = _MhcMappings.apply(
        _flat(x, K, "x"), proj_weight.contiguous(), alpha.reshape(3).contiguous(), bias.reshape(M).contiguous(),
        n, int(iterations), float(eps),
    )  # fmt: skip
    return h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n)


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, n, iterations, eps):
        T = z.shape[0]
        out = torch.empty(T, n, n, device=z.device, dtype=torch.float32)
        BT = _coef_block(T, n)
        _sinkhorn_fwd[(triton.cdiv(T, BT),)](z, out, T, n, iterations, eps, BT=BT, NP=_p2(n))
        ctx.save_for_backward(z)
        ctx.cfg = (n, iterations, eps)
        return out

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        n, iterations, eps = ctx.cfg
        T = z.shape[0]
        dz = torch.empty(T, n, n, device=z.device, dtype=torch.float32)
        BT = _coef_block(T, n)
        scr = _sk_scratch(T, n, iterations, z.device)
        _sinkhorn_bwd[(triton.cdiv(T, BT),)](
            z, g.float().contiguous(), dz, scr, T, n, iterations, eps, BT=BT, NP=_p2(n)
        )
        return dz.to(z.dtype), None, None, None


def sinkhorn(logits, iterations, eps):
    """[..., n, n] -> [..., n, n] fp32; see reference.sinkhorn."""
    _check_device(logits)
    n = logits.shape[-1]
    if logits.dim() < 2 or logits.shape[-2] != n:
        raise ValueError(f"sinkhorn: logits must be [..., n, n], got {tuple(logits.shape)}")
    if iterations < 1:
        raise ValueError(f"sinkhorn iterations must be >= 1, got {iterations}")
    lead = logits.shape[:-2]
    out = _Sinkhorn.apply(logits.reshape(-1, n, n).contiguous(), n, int(iterations), float(eps))
    return out.view(*lead, n, n)


# ------------------------------------------------------------------------------------------ aggregate / mean


@triton.jit
def _aggregate_fwd(
    x_ptr, w_ptr, u_ptr, T, h, n: tl.constexpr, UNIFORM: tl.constexpr,
    BT: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """u[t, d] = sum_i w[t, i] x[t, i, d] (w = 1/n when UNIFORM)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BH + tl.arange(0, BH)
    i = tl.arange(0, NP)
    rmask = rows < T
    vmask = rmask[:, None] & (i[None, :] < n)
    if UNIFORM:
        w = tl.where(vmask, 1.0 / n, 0.0)
    else:
        w = tl.load(w_ptr + rows[:, None] * n + i[None, :], mask=vmask, other=0.0).to(tl.float32)
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
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    i = tl.arange(0, NP)
    rmask = rows < T
    vmask = rmask[:, None] & (i[None, :] < n)
    if UNIFORM:
        w = tl.where(vmask, 1.0 / n, 0.0)
    else:
        w = tl.load(w_ptr + rows[:, None] * n + i[None, :], mask=vmask, other=0.0).to(tl.float32)
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


def _stream_blocks(T: int, n: int, h: int, budget: int = 4096) -> tuple[int, int, int]:
    """(BT, NP, BH) for [BT, NP, BH] tiles of about `budget` elements."""
    NP = _p2(n)
    BH = max(16, min(_p2(h), MAX_BLOCK_H))
    BT = max(1, min(_p2(T), MAX_BLOCK_T, budget // (NP * BH) or 1))
    return BT, NP, BH


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, w, n, uniform):
        T = x2.shape[0]
        h = x2.shape[1] // n
        u = torch.empty(T, h, device=x2.device, dtype=x2.dtype)
        BT, NP, BH = _stream_blocks(T, n, h)
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
        BT, NP, BH = _stream_blocks(T, n, h)
        _aggregate_bwd[(triton.cdiv(T, BT),)](
            x2, x2 if uniform else w, du.contiguous(), dx, dw, T, h, n=n, UNIFORM=uniform, BT=BT, NP=NP, BH=BH
        )
        return dx, (None if uniform else dw.to(w.dtype)), None, None


def mhc_aggregate(x, h_pre, n):
    """[..., n*h], h_pre [..., n] -> [..., h] in x's dtype."""
    _check_device(x, h_pre)
    K = x.shape[-1]
    if K % n:
        raise ValueError(f"last dim {K} of x is not a multiple of n={n}")
    lead = x.shape[:-1]
    if tuple(h_pre.shape) != (*lead, n):
        raise ValueError(f"mhc_aggregate: h_pre must be {(*lead, n)}, got {tuple(h_pre.shape)}")
    u = _Aggregate.apply(_flat(x, K, "x"), _flat(h_pre, n, "h_pre"), n, False)
    return u.view(*lead, K // n)


def average_output_contract(x, n):
    """[..., n*h] -> [..., h] = mean over streams, in x's dtype."""
    _check_device(x)
    K = x.shape[-1]
    if K % n:
        raise ValueError(f"last dim {K} of x is not a multiple of n={n}")
    x2 = _flat(x, K, "x")
    u = _Aggregate.apply(x2, x2.new_empty(0), n, True)
    return u.view(*x.shape[:-1], K // n)


# ------------------------------------------------------------------------------------------ post + residual


@triton.jit
def _post_res_fwd(
    x_ptr, f_ptr, post_ptr, res_ptr, out_ptr, T, h, n: tl.constexpr,
    BT: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """out[t, k, d] = post[t, k] f[t, d] + sum_j res[t, j, k] x[t, j, d]."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    d = tl.program_id(1) * BH + tl.arange(0, BH)
    k = tl.arange(0, NP)
    rmask = rows < T
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
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    i = tl.arange(0, NP)
    rmask = rows < T
    vmask = rmask[:, None] & (i[None, :] < n)
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


def post_res_bwd_meta(T: int, n: int, h: int) -> dict:
    """`_post_res_bwd` holds [BT, NP, NP, BH] products and [BT, NP, BH] tiles: keep them <= 4096 / 2048 elements."""
    NP = _p2(n)
    BH = max(16, min(_p2(h), MAX_BLOCK_H, 4096 // (NP * NP)))
    BT = max(1, min(_p2(T), MAX_BLOCK_T, 4096 // (NP * NP * BH), 2048 // (NP * BH)))
    return dict(BT=BT, NP=NP, BH=BH)


class _PostRes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, f2, post, res, n):
        T = x2.shape[0]
        h = x2.shape[1] // n
        out = torch.empty_like(x2)
        BT, NP, BH = _stream_blocks(T, n, h)
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
        meta = post_res_bwd_meta(T, n, h)
        _post_res_bwd[(triton.cdiv(T, meta["BT"]),)](
            x2, f2, post, res, g.contiguous(), dx, df, dpost, dres, T, h, n=n, **meta
        )
        return dx, df, dpost.to(post.dtype), dres.to(res.dtype), None


def mhc_post_res(x, f, h_post, h_res, n):
    """[..., n*h], f [..., h], h_post [..., n], h_res [..., n, n] -> [..., n*h] in x's dtype."""
    _check_device(x, f, h_post, h_res)
    K = x.shape[-1]
    if K % n:
        raise ValueError(f"last dim {K} of x is not a multiple of n={n}")
    lead = x.shape[:-1]
    h = K // n
    for name, t, want in (("f", f, (*lead, h)), ("h_post", h_post, (*lead, n)), ("h_res", h_res, (*lead, n, n))):
        if tuple(t.shape) != want:
            raise ValueError(f"mhc_post_res: {name} must be {want}, got {tuple(t.shape)}")
    if f.dtype != x.dtype:
        f = f.to(x.dtype)
    out = _PostRes.apply(
        _flat(x, K, "x"), _flat(f, h, "f"), _flat(h_post, n, "h_post"), h_res.reshape(-1, n, n).contiguous(), n
    )
    return out.view(*lead, K)


# ------------------------------------------------------------------------------------------ learned contraction


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
def _row_stream(x_ptr, xrow, j: tl.constexpr, h, d, ymask):
    """Stream j of BT token rows -> [BT, HP] fp32."""
    return tl.load(x_ptr + xrow + j * h + d[None, :], mask=ymask, other=0.0).to(tl.float32)


@triton.jit
def _row_dot(xj, fn_ptr, m: tl.constexpr, j: tl.constexpr, K, h, d, dmask):
    """<x_j, head_fn[m, j*h:(j+1)*h]> per token -> [BT] (the head_fn slice is loaded [HP], from L2)."""
    w = tl.load(fn_ptr + m * K + j * h + d, mask=dmask, other=0.0).to(tl.float32)
    return tl.sum(xj * w[None, :], axis=1)


@triton.jit
def _row_mix(fn_ptr, m: tl.constexpr, K, h, d, dmask, n: tl.constexpr, x0, x1, x2, x3, x4, x5, x6, x7):
    """Row m of x @ head_fn^T per token, summed stream by stream (x_j unused for j >= n)."""
    acc = _row_dot(x0, fn_ptr, m, 0, K, h, d, dmask)
    if n > 1:
        acc += _row_dot(x1, fn_ptr, m, 1, K, h, d, dmask)
    if n > 2:
        acc += _row_dot(x2, fn_ptr, m, 2, K, h, d, dmask)
    if n > 3:
        acc += _row_dot(x3, fn_ptr, m, 3, K, h, d, dmask)
    if n > 4:
        acc += _row_dot(x4, fn_ptr, m, 4, K, h, d, dmask)
    if n > 5:
        acc += _row_dot(x5, fn_ptr, m, 5, K, h, d, dmask)
    if n > 6:
        acc += _row_dot(x6, fn_ptr, m, 6, K, h, d, dmask)
    if n > 7:
        acc += _row_dot(x7, fn_ptr, m, 7, K, h, d, dmask)
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
    """One read of x: BT whole token rows stay in registers, one [BT, HP] tensor per stream (n <= 8), while
    mix = x @ fn^T, sum(x^2), pre = sigmoid(mix r scale + base) + eps and y = sum_i pre_i x_i are formed.
    head_fn is read (from L2) in [HP] slices, one per (row m, stream j), so only x is held whole."""
    K = n * h
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    i = tl.arange(0, NP)
    d = tl.arange(0, HP)
    dmask = d < h
    ymask = rmask[:, None] & dmask[None, :]
    xrow = rows[:, None].to(tl.int64) * K
    x0 = _row_stream(x_ptr, xrow, 0, h, d, ymask)
    ss = tl.sum(x0 * x0, axis=1)
    x1 = x0
    x2 = x0
    x3 = x0
    x4 = x0
    x5 = x0
    x6 = x0
    x7 = x0
    if n > 1:
        x1 = _row_stream(x_ptr, xrow, 1, h, d, ymask)
        ss += tl.sum(x1 * x1, axis=1)
    if n > 2:
        x2 = _row_stream(x_ptr, xrow, 2, h, d, ymask)
        ss += tl.sum(x2 * x2, axis=1)
    if n > 3:
        x3 = _row_stream(x_ptr, xrow, 3, h, d, ymask)
        ss += tl.sum(x3 * x3, axis=1)
    if n > 4:
        x4 = _row_stream(x_ptr, xrow, 4, h, d, ymask)
        ss += tl.sum(x4 * x4, axis=1)
    if n > 5:
        x5 = _row_stream(x_ptr, xrow, 5, h, d, ymask)
        ss += tl.sum(x5 * x5, axis=1)
    if n > 6:
        x6 = _row_stream(x_ptr, xrow, 6, h, d, ymask)
        ss += tl.sum(x6 * x6, axis=1)
    if n > 7:
        x7 = _row_stream(x_ptr, xrow, 7, h, d, ymask)
        ss += tl.sum(x7 * x7, axis=1)
    r = 1.0 / tl.sqrt(ss / K + eps)  # [BT]
    mix = tl.zeros((BT, NP), dtype=tl.float32)
    for m in tl.static_range(n):
        mm = _row_mix(fn_ptr, m, K, h, d, dmask, n, x0, x1, x2, x3, x4, x5, x6, x7)
        mix = tl.where(i[None, :] == m, mm[:, None], mix)
    base = tl.load(base_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr).to(tl.float32)
    vmask = rmask[:, None] & (i[None, :] < n)
    pre = tl.where(vmask, tl.sigmoid(mix * r[:, None] * scale + base[None, :]) + eps, 0.0)
    y = _pick(pre, i, 0) * x0
    if n > 1:
        y += _pick(pre, i, 1) * x1
    if n > 2:
        y += _pick(pre, i, 2) * x2
    if n > 3:
        y += _pick(pre, i, 3) * x3
    if n > 4:
        y += _pick(pre, i, 4) * x4
    if n > 5:
        y += _pick(pre, i, 5) * x5
    if n > 6:
        y += _pick(pre, i, 6) * x6
    if n > 7:
        y += _pick(pre, i, 7) * x7
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
def _contract_bwd_row(
    x_ptr, dy_ptr, fn_ptr, mix_ptr, rstd_ptr, pre_ptr, scale_ptr, dx_ptr, dmix_ptr, dz_ptr, dscale_ptr, T, h, eps,
    n: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, HP: tl.constexpr,
):  # fmt: skip
    """One read of x and of dy: with whole rows on chip (one [BT, HP] tensor per stream), dpre_i = <dy, x_i>,
    the sigmoid / RMS chain (dmix, dz = dbase per token, dscale per token) and
    dx_i = sum_m dmix[m] head_fn[m, i-slice] - (dL/dr) r^3 x_i / K + pre_i dy. dhead_fn = dmix^T x is a
    reduction over tokens and is left to `_proj_bwd` (HAS_DX=False)."""
    K = n * h
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    i = tl.arange(0, NP)
    d = tl.arange(0, HP)
    dmask = d < h
    ymask = rmask[:, None] & dmask[None, :]
    xrow = rows[:, None].to(tl.int64) * K
    dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * h + d[None, :], mask=ymask, other=0.0).to(tl.float32)
    x0 = _row_stream(x_ptr, xrow, 0, h, d, ymask)
    dpre = tl.where(i[None, :] == 0, tl.sum(x0 * dy, axis=1)[:, None], 0.0)
    x1 = x0
    x2 = x0
    x3 = x0
    x4 = x0
    x5 = x0
    x6 = x0
    x7 = x0
    if n > 1:
        x1 = _row_stream(x_ptr, xrow, 1, h, d, ymask)
        dpre = tl.where(i[None, :] == 1, tl.sum(x1 * dy, axis=1)[:, None], dpre)
    if n > 2:
        x2 = _row_stream(x_ptr, xrow, 2, h, d, ymask)
        dpre = tl.where(i[None, :] == 2, tl.sum(x2 * dy, axis=1)[:, None], dpre)
    if n > 3:
        x3 = _row_stream(x_ptr, xrow, 3, h, d, ymask)
        dpre = tl.where(i[None, :] == 3, tl.sum(x3 * dy, axis=1)[:, None], dpre)
    if n > 4:
        x4 = _row_stream(x_ptr, xrow, 4, h, d, ymask)
        dpre = tl.where(i[None, :] == 4, tl.sum(x4 * dy, axis=1)[:, None], dpre)
    if n > 5:
        x5 = _row_stream(x_ptr, xrow, 5, h, d, ymask)
        dpre = tl.where(i[None, :] == 5, tl.sum(x5 * dy, axis=1)[:, None], dpre)
    if n > 6:
        x6 = _row_stream(x_ptr, xrow, 6, h, d, ymask)
        dpre = tl.where(i[None, :] == 6, tl.sum(x6 * dy, axis=1)[:, None], dpre)
    if n > 7:
        x7 = _row_stream(x_ptr, xrow, 7, h, d, ymask)
        dpre = tl.where(i[None, :] == 7, tl.sum(x7 * dy, axis=1)[:, None], dpre)
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
    c = -(dscale * scale) * r * r / K  # dL/dr = sum_i dz_i mix_i scale ; dr/dx = -r^3 x / K
    tl.store(dz_ptr + off, dz, mask=vmask)
    tl.store(dmix_ptr + off, dmix, mask=vmask)
    tl.store(dscale_ptr + rows, dscale, mask=rmask)
    dxp = dx_ptr + xrow + d[None, :]
    ety = dx_ptr.dtype.element_ty
    tl.store(dxp, _row_dx(x0, dy, _pick(pre, i, 0), c, dmix, i, fn_ptr, 0, K, h, d, dmask, n).to(ety), mask=ymask)
    if n > 1:
        dx1 = _row_dx(x1, dy, _pick(pre, i, 1), c, dmix, i, fn_ptr, 1, K, h, d, dmask, n)
        tl.store(dxp + h, dx1.to(ety), mask=ymask)
    if n > 2:
        dx2 = _row_dx(x2, dy, _pick(pre, i, 2), c, dmix, i, fn_ptr, 2, K, h, d, dmask, n)
        tl.store(dxp + 2 * h, dx2.to(ety), mask=ymask)
    if n > 3:
        dx3 = _row_dx(x3, dy, _pick(pre, i, 3), c, dmix, i, fn_ptr, 3, K, h, d, dmask, n)
        tl.store(dxp + 3 * h, dx3.to(ety), mask=ymask)
    if n > 4:
        dx4 = _row_dx(x4, dy, _pick(pre, i, 4), c, dmix, i, fn_ptr, 4, K, h, d, dmask, n)
        tl.store(dxp + 4 * h, dx4.to(ety), mask=ymask)
    if n > 5:
        dx5 = _row_dx(x5, dy, _pick(pre, i, 5), c, dmix, i, fn_ptr, 5, K, h, d, dmask, n)
        tl.store(dxp + 5 * h, dx5.to(ety), mask=ymask)
    if n > 6:
        dx6 = _row_dx(x6, dy, _pick(pre, i, 6), c, dmix, i, fn_ptr, 6, K, h, d, dmask, n)
        tl.store(dxp + 6 * h, dx6.to(ety), mask=ymask)
    if n > 7:
        dx7 = _row_dx(x7, dy, _pick(pre, i, 7), c, dmix, i, fn_ptr, 7, K, h, d, dmask, n)
        tl.store(dxp + 7 * h, dx7.to(ety), mask=ymask)


@triton.jit
def _contract_bwd_coef(
    x_ptr, dy_ptr, mix_ptr, rstd_ptr, pre_ptr, scale_ptr, dmix_ptr, dz_ptr, xcoef_ptr, dscale_ptr, T, h, eps,
    n: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr,
):  # fmt: skip
    """dpre_i = <dy, x_i> over h, then the sigmoid / RMS chain: dmix, dz (= dbase per token), xcoef, dscale per token."""
    K = n * h
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    i = tl.arange(0, NP)
    rmask = rows < T
    vmask = rmask[:, None] & (i[None, :] < n)
    dpre = tl.zeros((BT, NP), dtype=tl.float32)
    for d0 in range(0, h, BH):
        d = d0 + tl.arange(0, BH)
        dmask = d < h
        dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * h + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        mask3 = vmask[:, :, None] & dmask[None, None, :]
        x = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * K + i[None, :, None] * h + d[None, None, :], mask=mask3, other=0.0)
        dpre += tl.sum(x.to(tl.float32) * dy.to(tl.float32)[:, None, :], axis=2)
    off = rows[:, None] * n + i[None, :]
    mix = tl.load(mix_ptr + off, mask=vmask, other=0.0)
    pre = tl.load(pre_ptr + off, mask=vmask, other=0.0)
    r = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    scale = tl.load(scale_ptr).to(tl.float32)
    s = pre - eps
    dz = tl.where(vmask, dpre * s * (1.0 - s), 0.0)
    dscale = tl.sum(dz * mix, axis=1) * r
    tl.store(dz_ptr + off, dz, mask=vmask)
    tl.store(dmix_ptr + off, dz * scale * r[:, None], mask=vmask)
    tl.store(dscale_ptr + rows, dscale, mask=rmask)
    # dL/dr = sum_i dz_i * mix_i * scale ; dr/dx = -r^3 x / K
    tl.store(xcoef_ptr + rows, -(dscale * scale) * r * r / K, mask=rmask)


def contract_fwd_meta(T: int, n: int, h: int) -> dict:
    """Constexprs and launch options of `_contract_fwd` (the two-pass fallback)."""
    return dict(
        BT=CONTRACT_TWO_PASS_BT, BK=max(16, min(_p2(n * h), MAX_BLOCK_K, 64)), BM=max(16, _p2(n)),
        BH=max(16, min(_p2(h), MAX_BLOCK_H, 128 if n <= 4 else 64)), PREC=DOT_PRECISION, num_warps=8, num_stages=3,
    )  # fmt: skip


def contract_row_meta(T: int, n: int, h: int) -> dict | None:
    """Constexprs and launch options of `_contract_fwd_row`, or None when a token row does not fit on chip.

    The program holds BT * NP * HP values (HP = next power of two >= h), CONTRACT_ROW_PER_THREAD = 64 per
    thread (num_warps = BT * NP * HP / 2048, at most 16). ptxas for sm_90 (tests/test_kernels_compile.py):
    n = 4, h = 7168 (4 x 8192 padded) -> 16 warps, 121-128 registers, no spills; n = 4, h = 4096 -> 8 warps,
    123-156 registers, no spills. Rows above CONTRACT_ROW_MAX_ELEMS = 32768 padded elements (n = 8 with
    h > 4096) would exceed the SM's registers and take the two-pass `_contract_fwd`.
    """
    NP, HP = _p2(n), _p2(h)
    row = NP * HP
    if row > CONTRACT_ROW_MAX_ELEMS:
        return None
    BT = 1
    while BT * 2 * row <= CONTRACT_ROW_MIN_ELEMS and triton.cdiv(T, BT * 2) >= MIN_PROGRAMS:
        BT *= 2
    num_warps = max(4, min(16, BT * row // (32 * CONTRACT_ROW_PER_THREAD)))
    return dict(BT=BT, NP=NP, HP=HP, num_warps=num_warps, num_stages=1)


def contract_bwd_row_meta(T: int, n: int, h: int) -> dict | None:
    """Launch config of `_contract_bwd_row` (the forward's), or None for the two-kernel backward.

    The backward also holds dy, the dx accumulator and a head_fn slice ([HP] each), so it fits in fewer
    cases than the forward. ptxas for sm_90, with and without the divisibility-by-16 specialisation: rows up
    to CONTRACT_BWD_ROW_MAX_ELEMS = 16384 padded elements (n = 4 with h <= 4096, n <= 2 with h <= 8192,
    n = 8 with h <= 2048) take 146-255 registers, no spills; 32768-element rows (n = 4, h = 7168 at 16 and
    32 warps; n = 8, h = 4096) spill 20-168 B, so they use `_contract_bwd_coef` + `_proj_bwd`.
    """
    meta = contract_row_meta(T, n, h)
    if meta is None or meta["NP"] * meta["HP"] > CONTRACT_BWD_ROW_MAX_ELEMS:
        return None
    return meta


class _LearnedContract(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, head_fn, base, scale, n, eps):
        T, K = x2.shape
        h = K // n
        y = torch.empty(T, h, device=x2.device, dtype=x2.dtype)
        mix = torch.empty(T, n, device=x2.device, dtype=torch.float32)
        pre = torch.empty_like(mix)
        rstd = torch.empty(T, device=x2.device, dtype=torch.float32)
        meta = contract_row_meta(T, n, h)
        kernel = _contract_fwd_row
        if meta is None:
            meta, kernel = contract_fwd_meta(T, n, h), _contract_fwd
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
        row = contract_bwd_row_meta(T, n, h)
        if row is not None:  # one read of x and dy for dx; dhead_fn (a sum over tokens) reads x once more
            dx = torch.empty_like(x2)
            _contract_bwd_row[(triton.cdiv(T, row["BT"]),)](
                x2, dy, head_fn, mix, rstd, pre, scale, dx, dmix, dz, dscale, T, h, eps, n=n, **row
            )
            _, dfn = _projection_bwd(x2, head_fn, dmix, None)
        else:
            BT, NP, BH = _stream_blocks(T, n, h)
            _contract_bwd_coef[(triton.cdiv(T, BT),)](
                x2, dy, mix, rstd, pre, scale, dmix, dz, xcoef, dscale, T, h, eps, n=n, BT=BT, NP=NP, BH=BH
            )
            dx, dfn = _projection_bwd(x2, head_fn, dmix, xcoef, pre=pre, dy=dy, h=h)
        return dx, dfn.to(head_fn.dtype), dz.sum(0).to(base_dtype), dscale.sum().reshape(1).to(scale.dtype), None, None


def learned_output_contract(x, head_fn, base, scale, n, eps):
    """[..., n*h] -> [..., h] in x's dtype; see reference.learned_output_contract."""
    _check_device(x, head_fn, base, scale)
    K = x.shape[-1]
    if K % n:
        raise ValueError(f"last dim {K} of x is not a multiple of n={n}")
    if tuple(head_fn.shape) != (n, K) or base.numel() != n or scale.numel() != 1:
        raise ValueError(
            f"learned_output_contract: expected head_fn [{n}, {K}], base [{n}], scale [1], got "
            f"{tuple(head_fn.shape)}, {tuple(base.shape)}, {tuple(scale.shape)}"
        )
    y = _LearnedContract.apply(
        _flat(x, K, "x"), head_fn.contiguous(), base.reshape(n).contiguous(), scale.reshape(1).contiguous(), n, float(eps)
    )
    return y.view(*x.shape[:-1], K // n)

