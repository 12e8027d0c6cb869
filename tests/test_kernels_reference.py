"""Reference ops (dsv4cli.kernels, impl='torch') against docs/design.md §2 written naively, HF's modules, and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

from dsv4cli import kernels
from dsv4cli.kernels import reference


def _naive_rsqrt(x_tok: list[float], eps: float) -> float:
    return 1.0 / math.sqrt(sum(v * v for v in x_tok) / len(x_tok) + eps)


def _naive_sinkhorn(logits: torch.Tensor, iterations: int, eps: float) -> torch.Tensor:
    """[n, n] -> [n, n] with explicit loops over rows and columns (docs/design.md §2.2 step 4)."""
    n = logits.shape[0]
    p = [[0.0] * n for _ in range(n)]
    for i in range(n):
        mx = max(float(logits[i, j]) for j in range(n))
        z = sum(math.exp(float(logits[i, j]) - mx) for j in range(n))
        for j in range(n):
            p[i][j] = math.exp(float(logits[i, j]) - mx) / z + eps

    def col_step():
        for j in range(n):
            s = sum(p[i][j] for i in range(n)) + eps
            for i in range(n):
                p[i][j] /= s

    def row_step():
        for i in range(n):
            s = sum(p[i]) + eps
            for j in range(n):
                p[i][j] /= s

    col_step()
    for _ in range(iterations - 1):
        row_step()
        col_step()
    return torch.tensor(p, dtype=torch.float64)


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _naive_mappings(x, w, alpha, bias, n, iterations, eps):
    """One token: x [n*h] -> (h_pre [n], h_post [n], h_res [n, n]) with loops."""
    xs = [float(v) for v in x]
    r = _naive_rsqrt(xs, eps)
    rows = w.shape[0]
    m = [sum(float(w[o, c]) * xs[c] for c in range(len(xs))) * r for o in range(rows)]
    pre = [_sig(m[i] * float(alpha[0]) + float(bias[i])) + eps for i in range(n)]
    post = [2.0 * _sig(m[n + i] * float(alpha[1]) + float(bias[n + i])) for i in range(n)]
    res_logits = torch.tensor(
        [[m[2 * n + i * n + j] * float(alpha[2]) + float(bias[2 * n + i * n + j]) for j in range(n)] for i in range(n)],
        dtype=torch.float64,
    )
    return torch.tensor(pre, dtype=torch.float64), torch.tensor(post, dtype=torch.float64), _naive_sinkhorn(
        res_logits, iterations, eps
    )


def _params(n, h, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n * n + 2 * n, n * h, generator=g, dtype=dtype) * 0.3
    alpha = torch.rand(3, generator=g, dtype=dtype) + 0.5
    bias = torch.randn(n * n + 2 * n, generator=g, dtype=dtype) * 0.5
    return w, alpha, bias


@pytest.mark.parametrize("n,h", [(1, 3), (2, 5), (4, 3)])
def test_mhc_mappings_equal_naive_loops(n, h):
    torch.manual_seed(1)
    x = torch.randn(2, 3, n * h, dtype=torch.float64)
    w, alpha, bias = _params(n, h)
    eps, iters = 1e-6, 7
    h_pre, h_post, h_res = kernels.mhc_mappings(x, w, alpha, bias, n, iters, eps, impl="torch")
    assert h_pre.shape == (2, 3, n) and h_post.shape == (2, 3, n) and h_res.shape == (2, 3, n, n)
    for a in range(2):
        for b in range(3):
            p, q, r = _naive_mappings(x[a, b], w, alpha, bias, n, iters, eps)
            torch.testing.assert_close(h_pre[a, b], p, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(h_post[a, b], q, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(h_res[a, b], r, rtol=1e-10, atol=1e-12)


def test_sinkhorn_ends_on_column_step_and_matches_loops():
    torch.manual_seed(2)
    logits = torch.randn(5, 4, 4, dtype=torch.float64) * 3
    out = kernels.sinkhorn(logits, 3, 1e-6, impl="torch")
    for t in range(5):
        torch.testing.assert_close(out[t], _naive_sinkhorn(logits[t], 3, 1e-6), rtol=1e-12, atol=1e-14)
    # ends on a column step: columns sum to 1 up to eps, rows only approximately
    torch.testing.assert_close(out.sum(-2), torch.ones(5, 4, dtype=torch.float64), rtol=0, atol=1e-5)
    assert out.dtype == torch.float64
    assert kernels.sinkhorn(logits.float(), 3, 1e-6, impl="torch").dtype == torch.float32
    assert kernels.sinkhorn(logits.bfloat16(), 3, 1e-6, impl="torch").dtype == torch.float32


def test_sinkhorn_single_iteration_is_softmax_then_column_normalise():
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    eps = 1e-3
    p = torch.softmax(logits, -1) + eps
    want = p / (p.sum(0, keepdim=True) + eps)
    torch.testing.assert_close(kernels.sinkhorn(logits, 1, eps, impl="torch"), want)


@pytest.mark.parametrize("n", [1, 3, 4])
def test_aggregate_and_post_res_equal_stream_loops(n):
    torch.manual_seed(3)
    h = 5
    x = torch.randn(2, 3, n * h, dtype=torch.float64)
    f = torch.randn(2, 3, h, dtype=torch.float64)
    h_pre = torch.rand(2, 3, n, dtype=torch.float64)
    h_post = torch.rand(2, 3, n, dtype=torch.float64)
    h_res = torch.rand(2, 3, n, n, dtype=torch.float64)
    xs = [x[..., i * h : (i + 1) * h] for i in range(n)]
    u_want = sum(h_pre[..., i : i + 1] * xs[i] for i in range(n))
    torch.testing.assert_close(kernels.mhc_aggregate(x, h_pre, n, impl="torch"), u_want)
    out = kernels.mhc_post_res(x, f, h_post, h_res, n, impl="torch")
    for k in range(n):
        want_k = h_post[..., k : k + 1] * f + sum(h_res[..., j, k : k + 1] * xs[j] for j in range(n))
        torch.testing.assert_close(out[..., k * h : (k + 1) * h], want_k)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_contractions_equal_stream_loops(n):
    torch.manual_seed(4)
    h, eps = 6, 1e-6
    x = torch.randn(4, n * h, dtype=torch.float64)
    head_fn = torch.randn(n, n * h, dtype=torch.float64) * 0.2
    base = torch.randn(n, dtype=torch.float64)
    scale = torch.tensor([0.7], dtype=torch.float64)
    y = kernels.learned_output_contract(x, head_fn, base, scale, n, eps, impl="torch")
    for t in range(4):
        xs = [float(v) for v in x[t]]
        r = _naive_rsqrt(xs, eps)
        pre = [
            _sig(sum(float(head_fn[i, c]) * xs[c] for c in range(n * h)) * r * 0.7 + float(base[i])) + eps
            for i in range(n)
        ]
        want = [sum(pre[i] * xs[i * h + d] for i in range(n)) for d in range(h)]
        torch.testing.assert_close(y[t], torch.tensor(want, dtype=torch.float64))
        mean = [sum(xs[i * h + d] for i in range(n)) / n for d in range(h)]
        torch.testing.assert_close(kernels.average_output_contract(x, n)[t], torch.tensor(mean, dtype=torch.float64))


def test_function_preserving_conversion_reproduces_average():
    """hc_head_fn = 0, scale = 1, base = logit(1/n - eps) makes the learned contraction the mean (docs/design.md §2.3)."""
    n, h, eps = 4, 8, 1e-6
    x = torch.randn(3, n * h)
    base = torch.full((n,), math.log((1 / n - eps) / (1 - (1 / n - eps))))
    y = kernels.learned_output_contract(x, torch.zeros(n, n * h), base, torch.ones(1), n, eps, impl="torch")
    torch.testing.assert_close(y, kernels.average_output_contract(x, n), rtol=1e-6, atol=1e-6)


def test_output_dtypes_follow_contract():
    n, h = 2, 4
    x = torch.randn(3, n * h).bfloat16()
    w, alpha, bias = (t.float() for t in _params(n, h))
    h_pre, h_post, h_res = kernels.mhc_mappings(x, w, alpha, bias, n, 4, 1e-6)
    assert h_pre.dtype == h_post.dtype == h_res.dtype == torch.float32
    assert kernels.mhc_aggregate(x, h_pre, n).dtype == torch.bfloat16
    f = torch.randn(3, h).bfloat16()
    assert kernels.mhc_post_res(x, f, h_post, h_res, n).dtype == torch.bfloat16
    y = kernels.learned_output_contract(x, torch.randn(n, n * h), torch.zeros(n), torch.ones(1), n, 1e-6)
    assert y.dtype == torch.bfloat16 and y.shape == (3, h)
    assert kernels.average_output_contract(x, n).dtype == torch.bfloat16


def test_impl_dispatch_rules(monkeypatch):
    x = torch.randn(2, 8)
    assert kernels.resolve_impl("auto", x) == "torch"
    assert kernels.resolve_impl("torch", x) == "torch"
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.resolve_impl("cuda", x)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.mhc_aggregate(x, torch.ones(2, 2), 2, impl="triton")


# ---------------------------------------------------------------- gradcheck (float64)


def test_gradcheck_mhc_mappings():
    n, h = 2, 3
    x = torch.randn(3, n * h, dtype=torch.float64, requires_grad=True)
    w, alpha, bias = (t.requires_grad_() for t in _params(n, h))
    fn = lambda *a: kernels.mhc_mappings(*a, n, 4, 1e-6, impl="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, alpha, bias))


def test_gradcheck_sinkhorn():
    logits = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: kernels.sinkhorn(t, 5, 1e-6, impl="torch"), (logits,))


def test_gradcheck_aggregate_post_res_contractions():
    n, h = 3, 4
    d = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, n * h, **d)
    h_pre, h_post, h_res = torch.rand(2, n, **d), torch.rand(2, n, **d), torch.rand(2, n, n, **d)
    f = torch.randn(2, h, **d)
    assert torch.autograd.gradcheck(lambda a, b: kernels.mhc_aggregate(a, b, n, impl="torch"), (x, h_pre))
    assert torch.autograd.gradcheck(
        lambda *a: kernels.mhc_post_res(*a, n, impl="torch"), (x, f, h_post, h_res)
    )
    head_fn, base, scale = torch.randn(n, n * h, **d), torch.randn(n, **d), torch.rand(1, **d)
    assert torch.autograd.gradcheck(
        lambda *a: kernels.learned_output_contract(*a, n, 1e-6, impl="torch"), (x, head_fn, base, scale)
    )
    assert torch.autograd.gradcheck(lambda a: kernels.average_output_contract(a, n), (x,))


# ---------------------------------------------------------------- HF transformers (independent implementation)


def _hf_config(n, h, iters, eps):
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    return DeepseekV4Config(hidden_size=h, hc_mult=n, hc_sinkhorn_iters=iters, hc_eps=eps, rms_norm_eps=eps)


@pytest.mark.parametrize("n,h", [(4, 16), (2, 7)])
def test_mhc_equals_hf_hyper_connection(n, h):
    """Weight mapping: HF fn = proj_weight, base = bias, scale = alpha (pre, post, comb); comb = h_res."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection

    eps, iters = 1e-6, 20
    torch.manual_seed(5)
    hf = DeepseekV4HyperConnection(_hf_config(n, h, iters, eps)).float()
    w, alpha, bias = (t.float() for t in _params(n, h, seed=6))
    with torch.no_grad():
        hf.fn.copy_(w)
        hf.base.copy_(bias)
        hf.scale.copy_(alpha)
    x = torch.randn(2, 5, n * h)
    with torch.no_grad():
        post, comb, collapsed = hf(x.view(2, 5, n, h))
    h_pre, h_post, h_res = kernels.mhc_mappings(x, w, alpha, bias, n, iters, eps, impl="torch")
    assert (h_post - post).abs().max() <= 1e-5
    assert (h_res - comb).abs().max() <= 1e-5
    u = kernels.mhc_aggregate(x, h_pre, n, impl="torch")
    assert (u - collapsed).abs().max() <= 1e-5
    # HF's decoder layer mixes with comb^T: post * f + comb^T @ x
    f = torch.randn(2, 5, h)
    hf_out = post.unsqueeze(-1) * f.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), x.view(2, 5, n, h))
    ours = kernels.mhc_post_res(x, f, h_post, h_res, n, impl="torch")
    assert (ours - hf_out.flatten(-2)).abs().max() <= 1e-5


@pytest.mark.parametrize("n,h", [(4, 16), (3, 5)])
def test_learned_contraction_equals_hf_hyper_head(n, h):
    """Weight mapping: HF hc_fn = head_fn, hc_base = base, hc_scale = scale."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperHead

    eps = 1e-6
    hf = DeepseekV4HyperHead(_hf_config(n, h, 20, eps)).float()
    torch.manual_seed(7)
    head_fn, base, scale = torch.randn(n, n * h) * 0.2, torch.randn(n), torch.tensor([0.8])
    with torch.no_grad():
        hf.hc_fn.copy_(head_fn)
        hf.hc_base.copy_(base)
        hf.hc_scale.copy_(scale)
    x = torch.randn(2, 5, n * h)
    with torch.no_grad():
        want = hf(x.view(2, 5, n, h))
    y = kernels.learned_output_contract(x, head_fn, base, scale, n, eps, impl="torch")
    assert (y - want).abs().max() <= 1e-5
