"""Plain-PyTorch reference of every mHC / output-contraction op: the CPU path and the ground truth.

Layout: the multi-stream state is `[..., n*h]`, stream-major (view as `[..., n, h]`).
All math runs in at least fp32 (float64 inputs stay float64, so gradcheck works);
`mhc_mappings` and `sinkhorn` return the compute dtype (fp32, or fp64 for fp64 inputs),
the other ops cast back to x's dtype. Formulas: docs/design.md §2.2 and §2.3.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "stream_rms_rsqrt",
    "learned_output_contract",
    "average_output_contract",
    "mhc_mappings",
    "sinkhorn",
    "mhc_aggregate",
    "mhc_post_res",
    "rms_norm",
]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any tensor is float64, else float32 (bf16/fp16 are promoted)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _streams(x: Tensor, n: int) -> Tensor:
    """[..., n*h] -> [..., n, h] view (raises with the numbers if n does not divide the last dim)."""
    if x.shape[-1] % n != 0:
        raise ValueError(f"last dim {x.shape[-1]} of x is not a multiple of n={n}")
    return x.unflatten(-1, (n, x.shape[-1] // n))


def stream_rms_rsqrt(x: Tensor, eps: float) -> Tensor:
    """[..., n*h] -> [..., 1]: rsqrt(mean(x^2 over the whole flattened stream vector) + eps)."""
    return torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def learned_output_contract(x: Tensor, head_fn: Tensor, base: Tensor, scale: Tensor, n: int, eps: float) -> Tensor:
    """[..., n*h] -> [..., h]: y = sum_i pre[i] * x_i, pre = sigmoid((x @ head_fn^T) * r * scale + base) + eps.

    head_fn [n, n*h], base [n], scale [1]; r = rsqrt(mean(x^2) + eps) per token.
    """
    dt = compute_dtype(x, head_fn, base, scale)
    xf = x.to(dt)
    r = stream_rms_rsqrt(xf, eps)
    pre = torch.sigmoid((xf @ head_fn.to(dt).t()) * r * scale.to(dt) + base.to(dt)) + eps  # [..., n]
    y = (pre.unsqueeze(-2) @ _streams(xf, n)).squeeze(-2)  # sum_i pre[i] x_i as a [1, n] @ [n, h] product
    return y.to(x.dtype)


def average_output_contract(x: Tensor, n: int) -> Tensor:
    """[..., n*h] -> [..., h]: y = mean_i x_i (legacy contraction, no parameters)."""
    dt = compute_dtype(x)
    return _streams(x.to(dt), n).mean(-2).to(x.dtype)


def sinkhorn(logits: Tensor, iterations: int, eps: float) -> Tensor:
    """[..., n, n] logits -> doubly-stochastic [..., n, n] in the compute dtype.

    DSv4 variant: p = softmax over the last axis + eps; columns divided by (column sum + eps);
    then (iterations - 1) rounds of rows / (row sum + eps), columns / (column sum + eps).
    Ends on a column step, so every column sums to ~1.
    """
    if iterations < 1:
        raise ValueError(f"sinkhorn iterations must be >= 1, got {iterations}")
    p = torch.softmax(logits.to(compute_dtype(logits)), dim=-1) + eps
    p = p / (p.sum(-2, keepdim=True) + eps)
    for _ in range(iterations - 1):
        p = p / (p.sum(-1, keepdim=True) + eps)
        p = p / (p.sum(-2, keepdim=True) + eps)
    return p


def mhc_logits(x: Tensor, proj_weight: Tensor, alpha: Tensor, bias: Tensor, n: int, eps: float) -> Tensor:
    """[..., n*h] -> [..., n*n+2n]: m = (x @ W^T) * r, each part times its gating scale, plus bias."""
    dt = compute_dtype(x, proj_weight, alpha, bias)
    xf = x.to(dt)
    m = (xf @ proj_weight.to(dt).t()) * stream_rms_rsqrt(xf, eps)
    a = alpha.to(dt)
    gate = torch.cat([a[0:1].expand(n), a[1:2].expand(n), a[2:3].expand(n * n)])
    return m * gate + bias.to(dt)


def mhc_mappings(
    x: Tensor, proj_weight: Tensor, alpha: Tensor, bias: Tensor, n: int, iterations: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """[..., n*h] -> (h_pre [..., n], h_post [..., n], h_res [..., n, n]), all in the compute dtype.

    proj_weight [n*n+2n, n*h]; alpha [3] = (pre, post, res) gating scales; bias [n*n+2n] ordered
    pre, post, res. h_pre = sigmoid(m_pre) + eps; h_post = 2 sigmoid(m_post);
    h_res = sinkhorn(m_res viewed row-major [n, n]).
    """
    m = mhc_logits(x, proj_weight, alpha, bias, n, eps)
    m_pre, m_post, m_res = m.split([n, n, n * n], dim=-1)
    h_pre = torch.sigmoid(m_pre) + eps
    h_post = 2.0 * torch.sigmoid(m_post)
    h_res = sinkhorn(m_res.unflatten(-1, (n, n)), iterations, eps)
    return h_pre, h_post, h_res


def mhc_aggregate(x: Tensor, h_pre: Tensor, n: int) -> Tensor:
    """[..., n*h], h_pre [..., n] -> u [..., h] = sum_i h_pre[i] * x_i (in x's dtype)."""
    dt = compute_dtype(x, h_pre)
    u = (h_pre.to(dt).unsqueeze(-2) @ _streams(x.to(dt), n)).squeeze(-2)  # [1, n] @ [n, h] per token
    return u.to(x.dtype)


def mhc_post_res(x: Tensor, f: Tensor, h_post: Tensor, h_res: Tensor, n: int) -> Tensor:
    """[..., n*h], f [..., h], h_post [..., n], h_res [..., n, n] -> [..., n*h] (x's dtype).

    x'_k = h_post[k] * f + sum_j h_res[j, k] * x_j  (the residual is mixed by H_res^T).
    """
    dt = compute_dtype(x, f, h_post, h_res)
    xs = _streams(x.to(dt), n)  # [..., n, h]
    mixed = h_res.to(dt).transpose(-1, -2) @ xs  # [..., k, h] = sum_j h_res[j, k] x_j
    out = h_post.to(dt).unsqueeze(-1) * f.to(dt).unsqueeze(-2) + mixed
    return out.flatten(-2).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """[..., h], weight [h] -> x * rsqrt(mean(x^2 over h) + eps) * weight (torch.nn.RMSNorm), in x's dtype.

    The per-stream `hnorm` of an MTP depth with mHC (docs/design.md §2.4) runs it on n times the tokens."""
    dt = compute_dtype(x, weight)
    xf = x.to(dt)
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.to(dt)).to(x.dtype)
