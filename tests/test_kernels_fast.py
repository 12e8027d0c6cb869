"""The fast PyTorch path (kernels/fast_cpu.py, what impl='torch' runs) against the plain reference.

Values and gradients against `reference.py` (autograd of the plain ops) in fp32, gradcheck in fp64,
O(1) tensors saved for backward, dtypes for bf16 activations, and the dispatch of impl='torch'.
"""

from __future__ import annotations

import pytest
import torch

from dsv4cli import kernels
from dsv4cli.kernels import fast_cpu, reference

EPS = 1e-6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mapping_args(n: int, h: int, lead=(3, 5), dtype=torch.float32, seed: int = 0):
    g = _gen(seed)
    x = torch.randn(*lead, n * h, generator=g, dtype=dtype)
    w = torch.randn(n * n + 2 * n, n * h, generator=g, dtype=dtype) * 0.3
    alpha = torch.rand(3, generator=g, dtype=dtype) + 0.5
    bias = torch.randn(n * n + 2 * n, generator=g, dtype=dtype) * 0.5
    return [t.requires_grad_() for t in (x, w, alpha, bias)]


def _grads(outputs, inputs, seed: int = 1):
    """Gradients of sum(out * random cotangent) over all outputs w.r.t. inputs."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = _gen(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, cot)


def _assert_same(fast, ref, atol, rtol=0.0):
    for a, b in zip(fast, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _assert_same_gradients(fast, ref, args) -> None:
    """Every input's gradient through `fast` equals the one through `ref` (fp32 tolerance), none ~0."""
    for a, b in zip(_grads(fast, args), _grads(ref, args)):
        assert b.abs().max() > 1e-3
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _saved_count(fn, *args) -> int:
    """How many tensors the autograd graph of fn(*args) keeps for backward."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return count


# ---------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("n,iterations", [(2, 1), (2, 3), (3, 4), (4, 20)])
def test_sinkhorn_backward_equals_autograd_of_plain_loop_fp32(n, iterations):
    logits = (torch.randn(7, 3, n, n, generator=_gen(n)) * 2.0).requires_grad_()
    fast = fast_cpu.sinkhorn(logits, iterations, EPS)
    ref = reference.sinkhorn(logits, iterations, EPS)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0.0)
    (g_fast,), (g_ref,) = _grads(fast, (logits,)), _grads(ref, (logits,))
    assert g_ref.abs().max() > 1e-3  # a gradient that could be wrong
    assert (g_fast - g_ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("n,iterations", [(2, 1), (3, 2), (4, 6)])
def test_sinkhorn_gradcheck_fp64(n, iterations):
    logits = torch.randn(2, 3, n, n, generator=_gen(7), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fast_cpu.sinkhorn(t, iterations, EPS), (logits,))


def test_sinkhorn_saves_only_the_logits_whatever_the_iterations():
    logits = torch.randn(16, 4, 4, requires_grad=True)
    counts = [_saved_count(fast_cpu.sinkhorn, logits, it, EPS) for it in (1, 5, 20)]
    assert counts == [1, 1, 1]
    # the plain loop keeps tensors for every step (what the custom backward avoids)
    assert _saved_count(reference.sinkhorn, logits, 20, EPS) > 20


def test_sinkhorn_bf16_input_returns_fp32_and_bf16_grad():
    logits = torch.randn(5, 4, 4).bfloat16().requires_grad_()
    out = fast_cpu.sinkhorn(logits, 3, EPS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.sinkhorn(logits, 3, EPS), atol=1e-6, rtol=0.0)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_sinkhorn_runs_on_one_thread_bit_identical_and_restores_the_thread_count():
    """The Sinkhorn loop runs with one intra-op thread (fast_cpu.one_thread): the same values, bit for bit,
    as the undecorated loop at 2 threads, and the caller's thread count is back afterwards (also on error)."""
    zt = torch.randn(4, 4, 1024, generator=_gen(3)) * 2.0
    gt = torch.randn(4, 4, 1024, generator=_gen(4))
    seen = []
    spy = fast_cpu.one_thread(lambda t: seen.append(torch.get_num_threads()) or t)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        spy(zt)
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            fast_cpu.one_thread(lambda t: (_ for _ in ()).throw(ValueError("boom")))(zt)
        assert torch.get_num_threads() == 2
        plain_f = fast_cpu.sinkhorn_fwd_t.__wrapped__(zt.clone(), 20, EPS)
        plain_b = fast_cpu.sinkhorn_bwd_t.__wrapped__(zt, gt, 20, EPS)
        assert torch.equal(fast_cpu.sinkhorn_fwd_t(zt.clone(), 20, EPS), plain_f)
        assert torch.equal(fast_cpu.sinkhorn_bwd_t(zt, gt, 20, EPS), plain_b)
    finally:
        torch.set_num_threads(before)


def test_sinkhorn_rejects_zero_iterations():
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        fast_cpu.sinkhorn(torch.zeros(2, 2), 0, EPS)


# ---------------------------------------------------------------- fused mappings


@pytest.mark.parametrize("n,h,iterations", [(1, 8, 3), (2, 5, 4), (4, 16, 20)])
def test_mappings_equal_reference_forward_and_gradients_fp32(n, h, iterations):
    args = _mapping_args(n, h)
    fast = fast_cpu.mhc_mappings(*args, n, iterations, EPS)
    ref = reference.mhc_mappings(*args, n, iterations, EPS)
    _assert_same(fast, ref, atol=1e-6)
    _assert_same_gradients(fast, ref, args)


def test_mappings_gradcheck_fp64():
    n, h = 3, 2
    args = _mapping_args(n, h, lead=(2, 3), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: fast_cpu.mhc_mappings(*a, n, 4, EPS), args)


def test_mappings_save_six_tensors_whatever_the_iterations():
    args = _mapping_args(4, 8)
    counts = [_saved_count(fast_cpu.mhc_mappings, *args, 4, it, EPS) for it in (1, 20)]
    assert counts == [6, 6]  # x, weight, alpha, bias, projection [T, M], rsqrt [T, 1]


def test_mappings_bf16_activations_fp32_params():
    x, w, alpha, bias = _mapping_args(2, 8)
    xb = x.detach().bfloat16().requires_grad_()
    fast = fast_cpu.mhc_mappings(xb, w, alpha, bias, 2, 5, EPS)
    ref = reference.mhc_mappings(xb, w, alpha, bias, 2, 5, EPS)
    assert all(t.dtype == torch.float32 for t in fast)
    _assert_same(fast, ref, atol=1e-6)
    g_fast, g_ref = _grads(fast, (xb, w)), _grads(ref, (xb, w))
    assert g_fast[0].dtype == torch.bfloat16 and g_fast[1].dtype == torch.float32
    torch.testing.assert_close(g_fast[1], g_ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fast[0].float(), g_ref[0].float(), atol=1e-2, rtol=1e-2)


def test_mappings_accept_non_contiguous_x():
    x, w, alpha, bias = _mapping_args(2, 4)
    xt = x.detach().transpose(0, 1).requires_grad_()  # [5, 3, 8], not contiguous
    _assert_same(fast_cpu.mhc_mappings(xt, w, alpha, bias, 2, 3, EPS),
                 reference.mhc_mappings(xt, w, alpha, bias, 2, 3, EPS), atol=1e-6)  # fmt: skip


def _pre_composed(x, w, alpha, bias, n, iterations):
    h_pre, h_post, h_res = reference.mhc_mappings(x, w, alpha, bias, n, iterations, EPS)
    return reference.mhc_aggregate(x, h_pre, n), h_post, h_res


@pytest.mark.parametrize("n,h,iterations", [(2, 5, 4), (4, 16, 20)])
def test_pre_equals_reference_mappings_then_aggregate_fp32(n, h, iterations):
    args = _mapping_args(n, h)
    fast = fast_cpu.mhc_pre(*args, n, iterations, EPS)
    ref = _pre_composed(*args, n, iterations)
    _assert_same(fast, ref, atol=1e-5, rtol=1e-5)
    _assert_same_gradients(fast, ref, args)


def test_pre_gradcheck_fp64_and_saves_six_tensors():
    n, h = 3, 2
    args = _mapping_args(n, h, lead=(2, 3), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: fast_cpu.mhc_pre(*a, n, 4, EPS), args)
    assert _saved_count(fast_cpu.mhc_pre, *args, n, 4, EPS) == 6  # as mhc_mappings; aggregate adds none


def test_pre_gradient_of_u_alone():
    """Only u used (h_post, h_res unused): the gradients still equal the composed reference."""
    args = _mapping_args(4, 8)
    fast, ref = fast_cpu.mhc_pre(*args, 4, 5, EPS)[0], _pre_composed(*args, 4, 5)[0]
    for a, b in zip(_grads(fast, args), _grads(ref, args)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _mix_then_post(x, w, alpha, bias, f, n, iterations, out_dtype=None):
    u, h_post, r = fast_cpu.mhc_pre_mix(x, w, alpha, bias, n, iterations, EPS)
    return u, fast_cpu.mhc_post(r, f, h_post, n, out_dtype)


def _ref_layer(x, w, alpha, bias, f, n, iterations):
    """u and x' of one sub-layer whose output is u * f (so f's gradient also flows through u)."""
    u, h_post, h_res = _pre_composed(x, w, alpha, bias, n, iterations)
    return u, reference.mhc_post_res(x, u * f, h_post, h_res, n)


@pytest.mark.parametrize("n,h,iterations", [(2, 5, 4), (4, 16, 20)])
def test_pre_mix_then_post_equals_reference_pre_post_res_fp32(n, h, iterations):
    """mhc_pre_mix + mhc_post (the residual mix taken in pre) == mappings, aggregate, post_res: values and
    the gradients of x (which now gets the residual's share from pre), w, alpha, bias and f."""
    args = _mapping_args(n, h)
    f = torch.randn(3, 5, h, generator=_gen(7)).requires_grad_()

    def fast_layer(x, w, alpha, bias, f):
        u, h_post, r = fast_cpu.mhc_pre_mix(x, w, alpha, bias, n, iterations, EPS)
        return u, fast_cpu.mhc_post(r, u * f, h_post, n)

    fast, ref = fast_layer(*args, f), _ref_layer(*args, f, n, iterations)
    _assert_same(fast, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(fast, [*args, f]), _grads(ref, [*args, f]), strict=True):
        assert b.abs().max() > 1e-3
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_pre_mix_and_post_gradcheck_fp64_and_post_is_in_place():
    n, h = 3, 2
    args = _mapping_args(n, h, lead=(2, 3), dtype=torch.float64)
    f = torch.randn(2, 3, h, generator=_gen(8), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: _mix_then_post(*a, n, 4), [*args, f])
    u, h_post, r = fast_cpu.mhc_pre_mix(*args, n, 4, EPS)
    assert r.shape == args[0].shape and fast_cpu.mhc_post(r, f, h_post, n) is r
    assert _saved_count(fast_cpu.mhc_pre_mix, *args, n, 4, EPS) == 7  # mhc_pre's six + h_res


def test_pre_mix_keeps_bf16_activations():
    args = _mapping_args(4, 8)
    xb = args[0].detach().to(torch.bfloat16).requires_grad_()
    f = torch.randn(3, 5, 8, generator=_gen(9), dtype=torch.bfloat16).requires_grad_()
    u, out = _mix_then_post(xb, *args[1:], f, 4, 5, out_dtype=torch.bfloat16)
    h_pre, h_post, h_res = reference.mhc_mappings(xb.float(), *args[1:], 4, 5, EPS)
    ref = reference.mhc_post_res(xb.float(), f.float(), h_post, h_res, 4)
    assert u.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)
    gx, gf = torch.autograd.grad(out, [xb, f], torch.ones_like(out))
    assert gx.dtype == gf.dtype == torch.bfloat16


# ---------------------------------------------------------------- aggregate, post + residual, contraction


def _stream_args(n: int, h: int, dtype=torch.float32, seed: int = 3):
    g = _gen(seed)
    d = dict(generator=g, dtype=dtype)
    x, f = torch.randn(4, 3, n * h, **d), torch.randn(4, 3, h, **d)
    h_pre, h_post, h_res = torch.rand(4, 3, n, **d), torch.rand(4, 3, n, **d) * 2, torch.rand(4, 3, n, n, **d)
    head_fn, base, scale = torch.randn(n, n * h, **d) * 0.3, torch.randn(n, **d), torch.rand(1, **d) + 0.5
    return [t.requires_grad_() for t in (x, f, h_pre, h_post, h_res, head_fn, base, scale)]


def _stream_ops(mod, n):
    """name -> (callable of the argument list, indices of the arguments it takes)."""
    return {
        "aggregate": (lambda a: mod.mhc_aggregate(a[0], a[2], n), (0, 2)),
        "post_res": (lambda a: mod.mhc_post_res(a[0], a[1], a[3], a[4], n), (0, 1, 3, 4)),
        "contract": (lambda a: mod.learned_output_contract(a[0], a[5], a[6], a[7], n, EPS), (0, 5, 6, 7)),
    }


@pytest.mark.parametrize("op", ["aggregate", "post_res", "contract"])
@pytest.mark.parametrize("n,h", [(1, 6), (4, 16)])
def test_stream_ops_equal_reference_forward_and_gradients_fp32(op, n, h):
    args = _stream_args(n, h)
    (fast_fn, used), (ref_fn, _) = _stream_ops(fast_cpu, n)[op], _stream_ops(reference, n)[op]
    fast, ref = fast_fn(args), ref_fn(args)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    inputs = [args[i] for i in used]
    for a, b in zip(_grads(fast, inputs), _grads(ref, inputs)):
        assert b.abs().max() > 1e-3
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["aggregate", "post_res", "contract"])
def test_stream_ops_gradcheck_fp64(op):
    n = 3
    args = _stream_args(n, 2, dtype=torch.float64)
    fn, used = _stream_ops(fast_cpu, n)[op]

    def call(*inputs):
        full = list(args)
        for i, t in zip(used, inputs):
            full[i] = t
        return fn(full)

    assert torch.autograd.gradcheck(call, tuple(args[i] for i in used))


def test_stream_ops_keep_bf16_activations():
    n, h = 2, 8
    x, f, h_pre, h_post, h_res, head_fn, base, scale = _stream_args(n, h)
    xb, fb = x.detach().bfloat16().requires_grad_(), f.detach().bfloat16().requires_grad_()
    outs = [fast_cpu.mhc_aggregate(xb, h_pre, n), fast_cpu.mhc_post_res(xb, fb, h_post, h_res, n),
            fast_cpu.learned_output_contract(xb, head_fn, base, scale, n, EPS)]  # fmt: skip
    refs = [reference.mhc_aggregate(xb, h_pre, n), reference.mhc_post_res(xb, fb, h_post, h_res, n),
            reference.learned_output_contract(xb, head_fn, base, scale, n, EPS)]  # fmt: skip
    for a, b in zip(outs, refs):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)
    sum(o.float().sum() for o in outs).backward()
    assert xb.grad.dtype == torch.bfloat16 and fb.grad.dtype == torch.bfloat16 and h_res.grad.dtype == torch.float32


# ---------------------------------------------------------------- dispatch


def test_impl_torch_runs_the_fast_functions():
    x, w, alpha, bias = _mapping_args(2, 4)
    h_pre, _, h_res = kernels.mhc_mappings(x, w, alpha, bias, 2, 3, EPS, impl="torch")
    assert type(h_pre.grad_fn).__name__ == "_MhcMappingsBackward"
    sk = kernels.sinkhorn(h_res.detach().requires_grad_(), 2, EPS, impl="torch").grad_fn  # a view of the output
    assert type(sk.next_functions[0][0]).__name__ == "_SinkhornBackward"
    f = torch.randn(3, 5, 4)
    assert type(kernels.mhc_aggregate(x, h_pre, 2, impl="auto").grad_fn).__name__ == "_AggregateBackward"
    assert type(kernels.mhc_post_res(x, f, h_pre, h_res, 2).grad_fn).__name__ == "_PostResBackward"
