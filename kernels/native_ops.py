"""mHC / contraction ops on the compiled CPU kernels (`mhc_cpu.c`, built by native_build.py), fp32 CPU tensors.

The same functions and autograd contract as fast_cpu.py's `mhc_pre`, `mhc_pre_mix`, `mhc_post` and
`learned_output_contract` (tests/test_kernels_native.py compares values and gradients with the reference),
with everything per token (RMS, gated logits, sigmoids, the Sinkhorn and its reverse, the stream sums,
the residual mix and their gradients) in one compiled pass per call; only the projections x @ W^T, its
input gradient and the weight gradient stay with torch's BLAS. Backward keeps x, the projection [T, M] and
the rsqrt [T] (as fast_cpu and the Triton kernels do) and recomputes the rest.

Shapes: T tokens (leading dims flattened), n streams, h hidden, K = n*h, M = n*n + 2n (n for the contraction).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fast_cpu
from .fast_cpu import _alpha_grad, _flat, _mapping_gate
from .native_build import library

F32 = torch.float32


def usable(*tensors: Tensor) -> bool:
    """True when the compiled path can take these tensors (CPU, fp32 / bf16 / fp16: not fp64) and is built."""
    return all(t.device.type == "cpu" and t.dtype != torch.float64 for t in tensors) and library() is not None


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def _f32(t: Tensor, *shape: int) -> Tensor:
    """t as a contiguous fp32 tensor of `shape` (no copy when it already is one)."""
    return t.reshape(shape).to(F32).contiguous()


def _forward(x2: Tensor, proj: Tensor, gate: Tensor, bias: Tensor, n: int, full: bool, iterations: int, eps: float,
             want_hres: bool, lead: tuple = ()) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """x2 [T, K], proj = x2 @ W^T [T, M] -> (rsq [T], u [T, h], post [T, n], hres [*lead, n, n] or rmix [*lead, K]);
    `full`: the mHC columns (pre, post, res), else pre only (the contraction: post and third are None). The third
    output is allocated in its final shape `lead` (T values): not a view, so mhc_post may update it in place."""
    T, K = x2.shape
    u, rsq = x2.new_empty(T, K // n), x2.new_empty(T)
    post = x2.new_empty(T, n) if full else None
    lead = tuple(lead) or (T,)
    third = (x2.new_empty(*lead, n, n) if want_hres else x2.new_empty(*lead, K)) if full else None
    hres, rmix = (third, None) if want_hres else (None, third)
    status = library().dsv4_mhc_fwd(T, n, K // n, int(full), int(full), iterations, eps, _ptr(x2), _ptr(proj),
                                    _ptr(gate), _ptr(bias), _ptr(rsq), _ptr(u), _ptr(post), _ptr(hres), _ptr(rmix),
                                    torch.get_num_threads())
    if status:
        raise MemoryError("dsv4_mhc_fwd: out of memory")
    return rsq, u, post, third


def _backward(x2, proj, rsq, gate, bias, n, full, iterations, eps, du, g_post=None, g3=None, g_res=None):
    """Backward of `_forward` -> (dx [T, K] without the projection's term, dmix, dzm, dz [T, M])."""
    T, K = x2.shape
    M = proj.shape[1]
    dx = torch.empty_like(x2)
    dmix, dzm, dz = (x2.new_empty(T, M) for _ in range(3))
    status = library().dsv4_mhc_bwd(T, n, K // n, int(full), int(full), iterations, eps, _ptr(x2), _ptr(proj),
                                    _ptr(rsq), _ptr(gate), _ptr(bias), _ptr(du), _ptr(g_post), _ptr(g3),
                                    _ptr(g_res), _ptr(dx), _ptr(dmix), _ptr(dzm), _ptr(dz),
                                    torch.get_num_threads())
    if status:
        raise MemoryError("dsv4_mhc_bwd: out of memory")
    return dx, dmix, dzm, dz


def _params(w: Tensor, gate: Tensor, bias: Tensor, K: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(weight [M, K], gate [M], bias [M]) in fp32, contiguous; ValueError (with the numbers) when a shape does
    not fit x's width K and n streams (n divides K: `_flat` checked): the C code sizes every buffer from K and n."""
    M = w.shape[0]
    if w.shape != (M, K) or gate.numel() != M or bias.numel() != M or M not in (n, n * n + 2 * n):
        raise ValueError(f"weight {tuple(w.shape)}, gate {gate.numel()} and bias {bias.numel()} do not fit x's width "
                         f"{K} and n={n} (expected [n*n+2n or n, K], [M], [M])")
    return w.to(F32), gate.to(F32).contiguous(), bias.reshape(-1).to(F32).contiguous()


class _Pre(torch.autograd.Function):
    """x -> (u, h_post, third): third is the residual mix r [..., K] (`mix`) or h_res [..., n, n]."""

    @staticmethod
    def forward(ctx, x, w, alpha, bias, n, iterations, eps, mix):
        K = x.shape[-1]
        x2 = _flat(x, n, F32).contiguous()  # ValueError when n does not divide K
        wd, gate, b = _params(w, _mapping_gate(alpha.to(F32), n), bias, K, n)
        if wd.shape[0] != n * n + 2 * n:
            raise ValueError(f"proj_weight {tuple(w.shape)}: expected [{n * n + 2 * n}, {K}] for n={n}")
        proj = x2 @ wd.t()
        lead = x.shape[:-1]
        rsq, u, post, third = _forward(x2, proj, gate, b, n, True, iterations, eps, want_hres=not mix, lead=lead)
        ctx.save_for_backward(x, w, alpha, bias, proj, rsq)
        ctx.cfg = (n, iterations, eps, mix)
        return u.view(*lead, K // n).to(x.dtype), post.view(*lead, n), third

    @staticmethod
    def backward(ctx, du, g_post, g_third):
        x, w, alpha, bias, proj, rsq = ctx.saved_tensors
        n, iterations, eps, mix = ctx.cfg
        T, K = proj.shape[0], x.shape[-1]
        x2 = _flat(x, n, F32).contiguous()  # ValueError when n does not divide K
        wd, gate, b = _params(w, _mapping_gate(alpha.to(F32), n), bias, K, n)
        third = {"g3": _f32(g_third, T, K)} if mix else {"g_res": _f32(g_third, T, n, n)}
        dx, dmix, dzm, dz = _backward(x2, proj, rsq, gate, b, n, True, iterations, eps, _f32(du, T, K // n),
                                      g_post=_f32(g_post, T, n), **third)
        dx.addmm_(dmix, wd)
        dgate, dbias = dzm.sum(0), dz.sum(0)
        dalpha = _alpha_grad(dgate, n)
        return (dx.view(x.shape).to(x.dtype), (dmix.t() @ x2).to(w.dtype), dalpha.view(alpha.shape).to(alpha.dtype),
                dbias.view(bias.shape).to(bias.dtype), None, None, None, None)  # fmt: skip


def mhc_pre(x, proj_weight, alpha, bias, n, iterations, eps):
    """See fast_cpu.mhc_pre: (u [..., h], h_post [..., n], h_res [..., n, n])."""
    fast_cpu._check_iterations(iterations)
    return _Pre.apply(x, proj_weight, alpha.reshape(3), bias, n, int(iterations), float(eps), False)


def mhc_pre_mix(x, proj_weight, alpha, bias, n, iterations, eps):
    """See fast_cpu.mhc_pre_mix: (u [..., h], h_post [..., n], r [..., n*h] fp32), r_k = sum_j h_res[j, k] x_j."""
    fast_cpu._check_iterations(iterations)
    return _Pre.apply(x, proj_weight, alpha.reshape(3), bias, n, int(iterations), float(eps), True)


class _Post(fast_cpu._Post):
    """fast_cpu's r += h_post (x) f (one torch op), with the backward's two stream sums in one compiled pass."""

    @staticmethod
    def backward(ctx, g):
        f, h_post = ctx.saved_tensors
        n = ctx.cfg[0]
        h = f.shape[-1]
        T = f.numel() // h
        # every tensor whose pointer C reads is bound to a name until the call returns (a temporary copy
        # passed as _ptr(_f32(...)) would be freed before C reads it)
        g2, f2, post = _f32(g, T, n * h), _f32(f, T, h), _f32(h_post, T, n)
        df, dpost = f.new_empty(T, h, dtype=F32), f.new_empty(T, n, dtype=F32)
        library().dsv4_mhc_post_bwd(T, n, h, _ptr(g2), _ptr(f2), _ptr(post), _ptr(df), _ptr(dpost),
                                    torch.get_num_threads())
        return g2.view(g.shape), df.view(f.shape).to(f.dtype), dpost.view(h_post.shape).to(h_post.dtype), None, None


def mhc_post(r: Tensor, f: Tensor, h_post: Tensor, n: int, out_dtype: torch.dtype | None = None) -> Tensor:
    """See fast_cpu.mhc_post: r [..., n*h] (fp32, updated in place) + h_post (x) f -> [..., n*h] in out_dtype."""
    return _Post.apply(r, f, h_post, n, out_dtype or r.dtype)


class _Contract(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, head_fn, base, scale, n, eps):
        K = x.shape[-1]
        x2 = _flat(x, n, F32).contiguous()  # ValueError when n does not divide K
        fn, gate, b = _params(head_fn, scale.reshape(1).expand(n), base, K, n)
        if fn.shape[0] != n:
            raise ValueError(f"head_fn {tuple(head_fn.shape)}: expected [{n}, {K}] for n={n}")
        proj = x2 @ fn.t()
        rsq, y, _, _ = _forward(x2, proj, gate, b, n, False, 1, eps, want_hres=False)
        ctx.save_for_backward(x, head_fn, base, scale, proj, rsq)
        ctx.cfg = (n, eps)
        return y.view(*x.shape[:-1], K // n).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, head_fn, base, scale, proj, rsq = ctx.saved_tensors
        n, eps = ctx.cfg
        T, K = proj.shape[0], x.shape[-1]
        x2 = _flat(x, n, F32).contiguous()  # ValueError when n does not divide K
        fn, gate, b = _params(head_fn, scale.reshape(1).expand(n), base, K, n)
        dx, dmix, dzm, dz = _backward(x2, proj, rsq, gate, b, n, False, 1, eps, _f32(dy, T, K // n))
        dx.addmm_(dmix, fn)
        return (dx.view(x.shape).to(x.dtype), (dmix.t() @ x2).to(head_fn.dtype), dz.sum(0).view(base.shape).to(base.dtype),
                dzm.sum().view(scale.shape).to(scale.dtype), None, None)  # fmt: skip


def learned_output_contract(x: Tensor, head_fn: Tensor, base: Tensor, scale: Tensor, n: int, eps: float) -> Tensor:
    """See fast_cpu.learned_output_contract: [..., n*h] -> [..., h] in x's dtype."""
    return _Contract.apply(x, head_fn, base, scale, n, float(eps))
