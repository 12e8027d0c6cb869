"""Fast PyTorch path of the mHC / contraction ops (what impl="torch" runs): reference.py's math, fewer ops.

`reference.py` stays the plain, readable ground truth; these ops compute the same functions
(tests/test_kernels_fast.py compares values and gradients) with hand-written backwards, so that
one call is one autograd node instead of tens, and keep only O(1) tensors per call for backward:

- `sinkhorn`: runs on the token-innermost layout `[n, n, T]`, where every row / column sum and
  division streams over T contiguous values (on `[T, n, n]` each op walks strided groups of n,
  ~8x slower per op on CPU). Backward keeps only the logits: it recomputes the iterations,
  then runs the steps in reverse (the math of triton_ops._sk_backward): step y = q / c, with
  c = sum(q) + eps along the normalised axis, has dq = (g - sum(g * y)) / c along that axis.
- `mhc_mappings`: RMS, projection, gating, sigmoids and Sinkhorn in one Function; saves x, the
  projection [T, M] and the rsqrt [T, 1] (as the Triton kernel does) and recomputes the rest.
- `learned_output_contract`: the same projection helper, sigmoid and weighted stream sum.
- `mhc_pre` (mappings + aggregate) and `mhc_pre_mix` (+ the residual mix sum_j h_res[j,k] x_j, taken
  while x is in cache; `mhc_post` then adds h_post (x) f in place): one Function each.
- `mhc_aggregate`, `mhc_post_res`: one Function each; per-token batched matmuls, the one-column
  products as a `bmm` with a row view (a [T, h, 1] column view takes a slow copy path), broadcasts for
  outer products.
- Sinkhorn's divisor (sum + eps along an axis) is one BLAS call with a ones vector: these ops are so
  small (n*n*T values) that each op's fixed cost dominates.
- The Sinkhorn loops run on one intra-op thread (`one_thread`): at these sizes more threads only add the
  thread pool's fork / join to every BLAS call (benchmarks/RESULTS.md, mHC fifth round).

Shapes: T tokens (all leading dims flattened), n streams, h hidden, K = n*h, M mapping width.
All math runs in reference.compute_dtype (fp32, fp64 for fp64 inputs); gradients come back in
each input's dtype.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .reference import compute_dtype

__all__ = ["sinkhorn", "mhc_mappings", "mhc_pre", "mhc_pre_mix", "mhc_aggregate", "mhc_post_res", "mhc_post",
           "learned_output_contract"]

# ------------------------------------------------------------------------------------------ Sinkhorn core


def _check_iterations(iterations: int) -> None:
    if iterations < 1:
        raise ValueError(f"sinkhorn iterations must be >= 1, got {iterations}")


def _step_dim(k: int) -> int:
    """Normalisation step k on [n(row i), n(col j), T]: even k divide columns (sum over i = dim 0), odd k rows."""
    return 0 if k % 2 == 0 else 1


def _eps_like(t: Tensor, eps: float) -> Tensor:
    """eps as a 0-dim tensor of t's dtype: adding a Python float costs a scalar-to-tensor conversion per op."""
    return torch.full((), eps, dtype=t.dtype, device=t.device)


def one_thread(fn):
    """Run fn with ONE intra-op thread (restored after): for ops on a few thousand values each, below torch's
    parallel grain size, where every BLAS call (MKL) and softmax otherwise forks and joins the thread pool.
    The Sinkhorn loop is ~80-240 such ops per call: with 2 threads they took 2.4x (forward) to 10x (backward,
    a busy second core) the one-thread time, with bit-identical results (each output element is computed by
    the same sequence of ops either way). `torch.set_num_threads` costs ~0.1 us; CPU only."""

    @functools.wraps(fn)
    def wrapper(zt: Tensor, *args):
        threads = torch.get_num_threads()
        if threads == 1 or zt.device.type != "cpu":
            return fn(zt, *args)
        torch.set_num_threads(1)
        try:
            return fn(zt, *args)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def _ones(zt: Tensor) -> Tensor:
    n = zt.shape[0]
    return torch.ones(n, 1, n, dtype=zt.dtype, device=zt.device)


@one_thread
def sinkhorn_fwd_t(zt: Tensor, iterations: int, eps: float) -> Tensor:
    """[n, n, T] logits (zt[i, j, t] = z[t, i, j]) -> doubly-stochastic [n, n, T], in place after the softmax.

    Each step's divisor, sum + eps along its axis, is ONE BLAS call with a ones vector (a sum then an add
    would be two ops, and these ops are so small that the per-op cost dominates): columns (even steps, sum
    over i) ones[1, n] @ p[n, n*T] -> [1, n, T]; rows (odd steps, sum over j) ones[n, 1, n] @ p -> [n, 1, T].
    Written into two reused buffers through views taken once: two dispatcher calls per step."""
    n, T = zt.shape[0], zt.shape[2]
    e, ones = _eps_like(zt, eps), _ones(zt)
    ones0 = ones[0]
    p = torch.softmax(zt, dim=1).add_(e)
    p2 = p.view(n, n * T)
    col, row = zt.new_empty(1, n * T), zt.new_empty(n, 1, T)
    col3 = col.view(1, n, T)
    torch.addmm(e, ones0, p2, out=col)  # step 0: columns
    p.div_(col3)
    for _ in range(iterations - 1):  # then rows, columns
        torch.baddbmm(e, ones, p, out=row)
        p.div_(row)
        torch.addmm(e, ones0, p2, out=col)
        p.div_(col3)
    return p


@one_thread
def sinkhorn_bwd_t(zt: Tensor, gt: Tensor, iterations: int, eps: float) -> Tensor:
    """[n, n, T] logits and d(loss)/d(output) -> d(loss)/d(logits) [n, n, T].

    Recomputes the forward (bit-identical ops) keeping each step's output y_k and divisor c_k
    (transient, freed on return), then walks the steps backwards; the softmax's eps is a shift."""
    n, T = zt.shape[0], zt.shape[2]
    e, ones = _eps_like(zt, eps), _ones(zt)
    ones0 = ones[0]
    sm = torch.softmax(zt, dim=1)
    p = sm + e
    outs, divs = [], []
    for k in range(2 * iterations - 1):  # the forward's divisor ops (bit-identical), fresh tensors kept
        c = torch.addmm(e, ones0, p.view(n, n * T)).view(1, n, T) if k % 2 == 0 else torch.baddbmm(e, ones, p)
        p = p / c
        outs.append(p)
        divs.append(c)
    g = gt
    for k in range(2 * iterations - 2, -1, -1):
        g = (g - (g * outs[k]).sum(_step_dim(k), keepdim=True)).div_(divs[k])
    return sm.mul_(g - (g * sm).sum(1, keepdim=True))


def _to_t(z: Tensor, n: int) -> Tensor:
    """[T, n*n] (row-major n x n per token, any strides) -> [n, n, T] contiguous."""
    return z.t().contiguous().view(n, n, -1)


def _from_t(pt: Tensor) -> Tensor:
    """[n, n, T] -> [T, n, n] contiguous."""
    return pt.permute(2, 0, 1).contiguous()


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, iterations, eps):  # z [T, n, n] in the compute dtype
        n = z.shape[-1]
        ctx.save_for_backward(z)
        ctx.cfg = (iterations, eps)
        return _from_t(sinkhorn_fwd_t(_to_t(z.view(-1, n * n), n), iterations, eps))

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        iterations, eps = ctx.cfg
        n = z.shape[-1]
        gt = _to_t(g.reshape(-1, n * n).to(z.dtype), n)
        return _from_t(sinkhorn_bwd_t(_to_t(z.view(-1, n * n), n), gt, iterations, eps)), None, None


def sinkhorn(logits: Tensor, iterations: int, eps: float) -> Tensor:
    """[..., n, n] logits -> doubly-stochastic [..., n, n] in the compute dtype; see reference.sinkhorn."""
    _check_iterations(iterations)
    n = logits.shape[-1]
    z = logits.to(compute_dtype(logits)).reshape(-1, n, n)
    return _Sinkhorn.apply(z, int(iterations), float(eps)).view(logits.shape)


# ------------------------------------------------------------------------------------------ RMS projection


def _logits(x2: Tensor, w: Tensor, gate: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x2 [T, K], w [M, K], gate and bias broadcastable to [M] -> (z, mix, r).

    mix = x2 @ w^T [T, M]; r = rsqrt(mean(x2^2) + eps) [T, 1]; z = mix * r * gate + bias [T, M]."""
    mix = x2 @ w.t()
    # mean(x2^2) as one reduction (square().mean() materialises a [T, K] temporary)
    ss = torch.linalg.vector_norm(x2, dim=-1, keepdim=True).square_()
    r = torch.rsqrt(ss.mul_(1.0 / x2.shape[-1]).add_(eps))
    return _gated(mix, r, gate, bias), mix, r


def _gated(mix: Tensor, r: Tensor, gate: Tensor, bias: Tensor) -> Tensor:
    """z = (mix * r) * gate + bias, the op order of reference.mhc_logits."""
    return (mix * r).mul_(gate).add_(bias)


def _logits_bwd(
    x2: Tensor, w: Tensor, gate: Tensor, mix: Tensor, r: Tensor, dz: Tensor, dx_extra: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of `_logits` for dz [T, M] -> (dx2 [T, K] (+ dx_extra), dw [M, K], dgate [M] per column, dbias [M]).

    With m = mix * r: dgate = sum_t dz * m, dm = dz * gate, dmix = dm * r, and
    dr/dx2 = -r^3 x2 / K, so dx2 = dmix @ w - (sum_m dm * mix) r^3 / K * x2."""
    K = x2.shape[-1]
    dgate = (dz * mix * r).sum(0)
    dbias = dz.sum(0)
    dm = dz * gate
    dmix = dm * r
    coef = (dm * mix).sum(-1, keepdim=True).mul_(r.pow(3)).mul_(-1.0 / K)
    dx = x2 * coef if dx_extra is None else dx_extra.addcmul_(x2, coef)  # dx_extra: a fresh buffer, reused
    dx.addmm_(dmix, w)
    return dx, dmix.t() @ x2, dgate, dbias


def _mapping_gate(alpha: Tensor, n: int) -> Tensor:
    """alpha [3] -> gate [n*n+2n]: alpha_pre over the pre columns, alpha_post over post, alpha_res over res."""
    return torch.cat([alpha[0:1].expand(n), alpha[1:2].expand(n), alpha[2:3].expand(n * n)])


def _alpha_grad(dgate: Tensor, n: int) -> Tensor:
    """Per-column gate gradient [n*n+2n] -> [3]: the sums over the pre, post and res columns (`_mapping_gate`'s backward)."""
    return torch.stack([dgate[:n].sum(), dgate[n : 2 * n].sum(), dgate[2 * n :].sum()])


def _flat(x: Tensor, n: int, dt: torch.dtype) -> Tensor:
    """[..., n*h] -> [T, n*h] in dt (raises with the numbers if n does not divide the last dim)."""
    if x.shape[-1] % n != 0:
        raise ValueError(f"last dim {x.shape[-1]} of x is not a multiple of n={n}")
    return x.reshape(-1, x.shape[-1]).to(dt)


# ------------------------------------------------------------------------------------------ mHC mappings


def _mappings_fwd(x, w, alpha, bias, n, iterations, eps):
    """x [..., n*h] -> (x2 [T, K], h_pre [T, n], h_post [T, n], h_res [T, n, n], mix [T, M], r [T, 1], dt)."""
    dt = compute_dtype(x, w, alpha, bias)
    x2, wd, a = _flat(x, n, dt), w.to(dt), alpha.to(dt)
    z, mix, r = _logits(x2, wd, _mapping_gate(a, n), bias.to(dt), eps)
    s = torch.sigmoid(z[:, : 2 * n])
    h_res = _from_t(sinkhorn_fwd_t(_to_t(z[:, 2 * n :], n), iterations, eps))
    return x2, s[:, :n] + eps, s[:, n:] * 2.0, h_res, mix, r, dt


def _mappings_bwd(saved, cfg, g_pre, g_post, g_res, pre_from_x=None):
    """Backward of `_mappings_fwd` from the saved (x, w, alpha, bias, mix, r, ...) and cfg (n, iterations, eps, dt)
    -> the grads of (x, w, alpha, bias). `pre_from_x(xs [T, n, h], h_pre [T, n]) -> (dxs, g_pre)` lets a
    fused consumer of h_pre (the aggregate) add its x-gradient and supply g_pre from the recomputed h_pre."""
    x, w, alpha, bias, mix, r = saved[:6]
    n, iterations, eps, dt = cfg
    x2, wd, gate = _flat(x, n, dt), w.to(dt), _mapping_gate(alpha.to(dt), n)
    z = _gated(mix, r, gate, bias.to(dt))
    T = x2.shape[0]
    sig = torch.sigmoid(z[:, : 2 * n])
    dx_extra = None
    if pre_from_x is not None:
        dxs, g_pre = pre_from_x(x2.view(T, n, -1), sig[:, :n] + eps)
        dx_extra = dxs.view(T, -1)
    dz = torch.empty_like(z)
    g_sig = torch.cat([g_pre.reshape(T, n).to(dt), g_post.reshape(T, n).to(dt) * 2.0], dim=-1)
    dz[:, : 2 * n] = torch.ops.aten.sigmoid_backward(g_sig, sig)
    gt = _to_t(g_res.reshape(T, n * n).to(dt), n)
    dz[:, 2 * n :] = sinkhorn_bwd_t(_to_t(z[:, 2 * n :], n), gt, iterations, eps).view(n * n, T).t()
    dx, dw, dgate, dbias = _logits_bwd(x2, wd, gate, mix, r, dz, dx_extra=dx_extra)
    dalpha = _alpha_grad(dgate, n)
    return (dx.view(x.shape).to(x.dtype), dw.to(w.dtype), dalpha.view(alpha.shape).to(alpha.dtype),
            dbias.view(bias.shape).to(bias.dtype))  # fmt: skip


class _MhcMappings(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, alpha, bias, n, iterations, eps):
        _, h_pre, h_post, h_res, mix, r, dt = _mappings_fwd(x, w, alpha, bias, n, iterations, eps)
        ctx.save_for_backward(x, w, alpha, bias, mix, r)
        ctx.cfg = (n, iterations, eps, dt)
        lead = x.shape[:-1]
        return h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n)

    @staticmethod
    def backward(ctx, g_pre, g_post, g_res):
        return (*_mappings_bwd(ctx.saved_tensors, ctx.cfg, g_pre, g_post, g_res), None, None, None)


class _MhcPre(torch.autograd.Function):
    """mappings + aggregate in one node: x -> (u, h_post, h_res); h_pre never leaves the Function.

    With `mix`, the third output is the residual mix r [..., n*h], r_k = sum_j h_res[j, k] x_j, instead of
    h_res: computed here, while x is still in cache, rather than after the sub-layer (post-res would read
    x again from memory); its backward adds h_res g to this node's one x-gradient (no second x-sized
    gradient for autograd to sum). `_Post` then adds h_post (x) f to r in place."""

    @staticmethod
    def forward(ctx, x, w, alpha, bias, n, iterations, eps, mix):
        x2, h_pre, h_post, h_res, proj, r, dt = _mappings_fwd(x, w, alpha, bias, n, iterations, eps)
        T = x2.shape[0]
        xs = x2.view(T, n, -1)
        u = _wsum(xs, h_pre)
        ctx.cfg = (n, iterations, eps, dt)
        lead = x.shape[:-1]
        if mix:
            third = torch.empty(x.shape, dtype=dt, device=x.device)  # not a view: _Post adds to it in place
            torch.bmm(h_res.transpose(1, 2), xs, out=third.view(T, n, -1))
            ctx.save_for_backward(x, w, alpha, bias, proj, r, h_res)
        else:
            third = h_res.view(*lead, n, n)
            ctx.save_for_backward(x, w, alpha, bias, proj, r)
        return u.view(*lead, u.shape[-1]).to(x.dtype), h_post.view(*lead, n), third

    @staticmethod
    def backward(ctx, du, g_post, g_third):
        n, dt = ctx.cfg[0], ctx.cfg[3]
        saved = ctx.saved_tensors  # once: under checkpointing each access unpacks again
        mixed = len(saved) == 7
        if mixed:
            x, h_res = saved[0], saved[6]
            xs = _streams(x, n, dt)
            g3 = g_third.reshape(xs.shape).to(dt)
            g_res = torch.bmm(xs, g3.transpose(1, 2))  # <x_j, g_k>
        else:
            g_res = g_third

        def pre_from_x(xs, h_pre):
            dxs, g_pre = _wsum_bwd(xs, h_pre, du.reshape(xs.shape[0], -1).to(dt))
            return (dxs.baddbmm_(h_res, g3) if mixed else dxs), g_pre  # dx_j += sum_k h_res[j, k] g_k

        return (*_mappings_bwd(saved, ctx.cfg, None, g_post, g_res, pre_from_x), None, None, None, None)


def mhc_pre(
    x: Tensor, proj_weight: Tensor, alpha: Tensor, bias: Tensor, n: int, iterations: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """[..., n*h] -> (u [..., h] (x's dtype), h_post [..., n], h_res [..., n, n]): mhc_mappings then
    mhc_aggregate with its h_pre, as one autograd node (one x-sized gradient instead of two summed)."""
    _check_iterations(iterations)
    return _MhcPre.apply(x, proj_weight, alpha.reshape(3), bias, n, int(iterations), float(eps), False)


def mhc_pre_mix(
    x: Tensor, proj_weight: Tensor, alpha: Tensor, bias: Tensor, n: int, iterations: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """[..., n*h] -> (u [..., h] (x's dtype), h_post [..., n], r [..., n*h] (compute dtype)): mhc_pre with the
    residual mix r_k = sum_j h_res[j, k] x_j in place of h_res; `mhc_post(r, f, h_post, n)` completes
    mhc_post_res (the same values: mhc_post(mhc_pre_mix(x)...) == mhc_post_res(x, f, h_post, h_res))."""
    _check_iterations(iterations)
    return _MhcPre.apply(x, proj_weight, alpha.reshape(3), bias, n, int(iterations), float(eps), True)


def mhc_mappings(
    x: Tensor, proj_weight: Tensor, alpha: Tensor, bias: Tensor, n: int, iterations: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """[..., n*h] -> (h_pre [..., n], h_post [..., n], h_res [..., n, n]) in the compute dtype; see reference."""
    _check_iterations(iterations)
    return _MhcMappings.apply(x, proj_weight, alpha.reshape(3), bias, n, int(iterations), float(eps))


# ------------------------------------------------------------------------------------------ stream sums


def _wsum(xs: Tensor, w: Tensor) -> Tensor:
    """xs [T, n, h], w [T, n] -> [T, h] = sum_i w[:, i] xs[:, i] (one [1, n] @ [n, h] product per token)."""
    return torch.bmm(w.unsqueeze(1), xs).squeeze(1)


def _wsum_bwd(xs: Tensor, w: Tensor, du: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of `_wsum` for du [T, h] -> (dxs [T, n, h] = w_i du (a broadcast), dw [T, n] = <xs_i, du>)."""
    du3 = du.unsqueeze(1)
    return w.unsqueeze(2) * du3, _dots(xs, du)


def _dots(xs: Tensor, v: Tensor) -> Tensor:
    """xs [T, n, h], v [T, h] -> [T, n] = <xs_i, v> per token: one batched matmul with v as a [T, h, 1] view
    of a row (strides (h, 1, h); the [T, h, 1] view with unit last stride takes a slow copy path)."""
    return torch.bmm(xs, v.unsqueeze(1).transpose(1, 2)).squeeze(2)


def _streams(x: Tensor, n: int, dt: torch.dtype) -> Tensor:
    """[..., n*h] -> [T, n, h] in dt."""
    x2 = _flat(x, n, dt)
    return x2.view(x2.shape[0], n, x2.shape[1] // n)


class _Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h_pre, n):
        dt = compute_dtype(x, h_pre)
        xs = _streams(x, n, dt)
        ctx.save_for_backward(x, h_pre)
        ctx.cfg = (n, dt)
        return _wsum(xs, h_pre.reshape(-1, n).to(dt)).view(*x.shape[:-1], xs.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, du):
        x, h_pre = ctx.saved_tensors
        n, dt = ctx.cfg
        xs = _streams(x, n, dt)
        dxs, dw = _wsum_bwd(xs, h_pre.reshape(-1, n).to(dt), du.reshape(xs.shape[0], -1).to(dt))
        return dxs.view(x.shape).to(x.dtype), dw.view(h_pre.shape).to(h_pre.dtype), None


def mhc_aggregate(x: Tensor, h_pre: Tensor, n: int) -> Tensor:
    """[..., n*h], h_pre [..., n] -> u [..., h] = sum_i h_pre[i] x_i (x's dtype); see reference."""
    return _Aggregate.apply(x, h_pre, n)


class _PostRes(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, h_post, h_res, n):
        dt = compute_dtype(x, f, h_post, h_res)
        xs = _streams(x, n, dt)
        T, _, h = xs.shape
        post, res, f2 = h_post.reshape(T, n).to(dt), h_res.reshape(T, n, n).to(dt), f.reshape(T, h).to(dt)
        # res^T x, then += post (x) f in place (baddbmm would first copy a materialised outer product)
        out = torch.bmm(res.transpose(1, 2), xs).addcmul_(post.unsqueeze(2), f2.unsqueeze(1))  # [T, k, h]
        ctx.save_for_backward(x, f, h_post, h_res)
        ctx.cfg = (n, dt)
        return out.view(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, f, h_post, h_res = ctx.saved_tensors
        n, dt = ctx.cfg
        xs = _streams(x, n, dt)
        T, _, h = xs.shape
        post, res, f2 = h_post.reshape(T, n).to(dt), h_res.reshape(T, n, n).to(dt), f.reshape(T, h).to(dt)
        g3 = g.reshape(T, n, h).to(dt)
        dx = torch.bmm(res, g3)  # dx_j = sum_k h_res[j, k] g_k
        dres = torch.bmm(xs, g3.transpose(1, 2))  # <x_j, g_k>
        dpost = _dots(g3, f2)  # <g_k, f>
        df = _wsum(g3, post)  # sum_k h_post[k] g_k
        return (dx.view(x.shape).to(x.dtype), df.view(f.shape).to(f.dtype), dpost.view(h_post.shape).to(h_post.dtype),
                dres.view(h_res.shape).to(h_res.dtype), None)  # fmt: skip


def mhc_post_res(x: Tensor, f: Tensor, h_post: Tensor, h_res: Tensor, n: int) -> Tensor:
    """[..., n*h], f [..., h], h_post [..., n], h_res [..., n, n] -> [..., n*h] (x's dtype); see reference."""
    return _PostRes.apply(x, f, h_post, h_res, n)


class _Post(torch.autograd.Function):
    """r [T, n*h] (mhc_pre_mix's residual mix, compute dtype) += h_post (x) f, in place; -> out_dtype."""

    @staticmethod
    def forward(ctx, r, f, h_post, n, out_dtype):
        dt = r.dtype
        T = f.numel() // f.shape[-1]
        post, f2 = h_post.reshape(T, n, 1).to(dt), f.reshape(T, 1, -1).to(dt)
        ctx.save_for_backward(f, h_post)
        ctx.cfg = (n, dt)
        if out_dtype == dt:
            ctx.mark_dirty(r)
            r.view(T, n, -1).addcmul_(post, f2)
            return r
        return torch.addcmul(r.view(T, n, -1), post, f2).view(r.shape).to(out_dtype)

    @staticmethod
    def backward(ctx, g):
        f, h_post = ctx.saved_tensors
        n, dt = ctx.cfg
        T = f.numel() // f.shape[-1]
        g3 = g.reshape(T, n, -1).to(dt)
        df = _wsum(g3, h_post.reshape(T, n).to(dt))  # sum_k h_post[k] g_k
        dpost = _dots(g3, f.reshape(T, -1).to(dt))  # <g_k, f>
        return g3.view(g.shape), df.view(f.shape).to(f.dtype), dpost.view(h_post.shape).to(h_post.dtype), None, None


def mhc_post(r: Tensor, f: Tensor, h_post: Tensor, n: int, out_dtype: torch.dtype | None = None) -> Tensor:
    """r [..., n*h] from mhc_pre_mix, f [..., h], h_post [..., n] -> x' = r + h_post (x) f [..., n*h] in
    out_dtype (default r's); r is updated in place (and returned) when no cast is needed."""
    return _Post.apply(r, f, h_post, n, out_dtype or r.dtype)


# ------------------------------------------------------------------------------------------ learned contraction


class _LearnedContract(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, head_fn, base, scale, n, eps):
        dt = compute_dtype(x, head_fn, base, scale)
        xs = _streams(x, n, dt)
        x2 = xs.view(xs.shape[0], -1)
        z, mix, r = _logits(x2, head_fn.to(dt), scale.to(dt), base.to(dt), eps)
        y = _wsum(xs, torch.sigmoid(z).add_(eps))
        ctx.save_for_backward(x, head_fn, base, scale, mix, r)
        ctx.cfg = (n, eps, dt)
        return y.view(*x.shape[:-1], xs.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, head_fn, base, scale, mix, r = ctx.saved_tensors
        n, eps, dt = ctx.cfg
        xs = _streams(x, n, dt)
        T = xs.shape[0]
        x2, fn, sc = xs.view(T, -1), head_fn.to(dt), scale.to(dt)
        s = torch.sigmoid(_gated(mix, r, sc, base.to(dt)))
        dxs, dpre = _wsum_bwd(xs, s + eps, dy.reshape(T, -1).to(dt))
        dz = torch.ops.aten.sigmoid_backward(dpre, s)
        dx, dfn, dgate, dbase = _logits_bwd(x2, fn, sc, mix, r, dz, dx_extra=dxs.view(T, -1))
        return (dx.view(x.shape).to(x.dtype), dfn.to(head_fn.dtype), dbase.view(base.shape).to(base.dtype),
                dgate.sum().view(scale.shape).to(scale.dtype), None, None)  # fmt: skip


def learned_output_contract(x: Tensor, head_fn: Tensor, base: Tensor, scale: Tensor, n: int, eps: float) -> Tensor:
    """[..., n*h] -> [..., h] in x's dtype; see reference.learned_output_contract."""
    return _LearnedContract.apply(x, head_fn, base, scale, n, float(eps))
