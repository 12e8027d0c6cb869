"""kernels.rms_norm (fast_rms_norm.py, hand-written backward; MTP's per-stream hnorm) and the one dispatch
place of the sub-layer's mHC (kernels.mhc_pre_mix / mhc_post)."""

from __future__ import annotations

import pytest
import torch

from dsv4cli import kernels
from dsv4cli.kernels import fast_rms_norm, reference
from dsv4cli.model.mtp import StreamRMSNorm, stream_norm

EPS = 1e-6


def _args(lead=(5, 3, 4), h=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, h, generator=g, dtype=dtype) * 1.7
    w = torch.rand(h, generator=g, dtype=dtype) + 0.5
    cot = torch.randn(*lead, h, generator=g, dtype=dtype)
    return x.requires_grad_(), w.requires_grad_(), cot


def test_forward_equals_torch_rms_norm_bit_for_bit():
    x, w, _ = _args(lead=(128, 8, 4), h=128)
    fast = fast_rms_norm.rms_norm(x, w, EPS)
    assert torch.equal(fast, torch.nn.functional.rms_norm(x, (128,), w, EPS))
    torch.testing.assert_close(fast, reference.rms_norm(x, w, EPS), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("h", [7, 128])
def test_gradients_equal_autograd_of_reference_fp32(h):
    x, w, cot = _args(h=h)
    fast = torch.autograd.grad(fast_rms_norm.rms_norm(x, w, EPS), (x, w), cot)
    ref = torch.autograd.grad(reference.rms_norm(x, w, EPS), (x, w), cot)
    for a, b in zip(fast, ref, strict=True):
        assert b.abs().max() > 1e-3
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-6  # fp32 rounding of another sum order


def test_gradcheck_fp64_and_saves_three_tensors():
    x, w, _ = _args(lead=(2, 3), h=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: fast_rms_norm.rms_norm(a, b, EPS), (x, w))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fast_rms_norm.rms_norm(x, w, EPS)
    assert len(saved) == 3  # x, weight, rsqrt [T, 1]


def test_bf16_activations_fp32_weight():
    x, w, cot = _args()
    xb = x.detach().bfloat16().requires_grad_()
    out = fast_rms_norm.rms_norm(xb, w, EPS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.rms_norm(xb, w, EPS).float(), atol=1e-2, rtol=1e-2)
    gx, gw = torch.autograd.grad(out, (xb, w), cot.bfloat16())
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32


def test_rejects_a_weight_of_another_width():
    x, w, _ = _args(h=8)
    with pytest.raises(ValueError, match="weight shape"):
        fast_rms_norm.rms_norm(x, w[:4], EPS)


def test_stream_norm_shares_the_weight_and_keeps_values():
    norm = torch.nn.RMSNorm(16, eps=EPS)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.sequence_parallel = True
    fast = stream_norm(norm)
    assert isinstance(fast, StreamRMSNorm) and fast.weight is norm.weight and list(fast.state_dict()) == ["weight"]
    x, _, cot = _args()
    assert torch.equal(fast(x), norm(x))
    assert type(fast(x).grad_fn).__name__ == "_RmsNormBackward"
    ln = torch.nn.LayerNorm(16)
    assert stream_norm(ln) is ln  # other norms unchanged


def test_pre_mix_dispatch_torch_gives_the_mix_triton_gives_x_and_h_res(monkeypatch):
    """The path is chosen in kernels only: torch -> r tensor (mhc_post adds in place); triton -> (x, h_res)."""
    n, h = 2, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, n * h, generator=g)
    w, alpha, bias = torch.randn(n * n + 2 * n, n * h, generator=g) * 0.3, torch.ones(3), torch.zeros(n * n + 2 * n)
    f = torch.randn(3, 2, h, generator=g)
    u, h_post, mix = kernels.mhc_pre_mix(x, w, alpha, bias, n, 3, EPS, impl="torch")
    assert isinstance(mix, torch.Tensor) and mix.shape == x.shape
    h_pre, h_post_ref, h_res = reference.mhc_mappings(x, w, alpha, bias, n, 3, EPS)
    expected = reference.mhc_post_res(x, f, h_post_ref, h_res, n)
    torch.testing.assert_close(kernels.mhc_post(mix, f, h_post, n), expected, atol=1e-6, rtol=1e-6)
    calls = []
    monkeypatch.setattr(kernels, "mhc_pre", lambda *a, impl: (calls.append(impl) or (u, h_post, h_res)))
    monkeypatch.setattr(kernels, "resolve_impl", lambda impl, t: "triton")
    monkeypatch.setattr(kernels, "mhc_post_res", lambda *a, impl: calls.append(impl) or reference.mhc_post_res(*a))
    u2, _, pair = kernels.mhc_pre_mix(x, w, alpha, bias, n, 3, EPS, impl="triton")
    assert isinstance(pair, tuple) and pair[0] is x and pair[1] is h_res
    torch.testing.assert_close(kernels.mhc_post(pair, f, h_post, n), expected, atol=1e-6, rtol=1e-6)
    assert calls == ["triton", "triton"]


def test_kernels_rms_norm_dispatch_on_cpu_uses_the_hand_written_backward():
    x, w, _ = _args()
    assert type(kernels.rms_norm(x, w, EPS).grad_fn).__name__ == "_RmsNormBackward"
