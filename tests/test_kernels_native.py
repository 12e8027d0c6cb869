"""The compiled CPU kernels (kernels/mhc_cpu.c via native_build.py / native_ops.py) against the plain reference.

Values and gradients of mhc_pre, mhc_pre_mix + mhc_post and the learned contraction against autograd of
`reference.py` in fp32 (token counts that are not a multiple of the block, h not a multiple of 8), bf16
activations, O(1) saved tensors, bit-equal results of the AVX2 and the baseline build, the dispatch of
impl='auto' / 'native' / 'torch', and the build itself (cache directory, a compiler that fails).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from dsv4cli import kernels
from dsv4cli.kernels import native_build, native_ops, reference
from test_kernels_fast import _gen, _grads, _mapping_args, _saved_count

EPS = 1e-6


@pytest.fixture(autouse=True)
def _needs_the_library():
    if native_build.library() is None:
        pytest.fail("the compiled CPU kernels did not build on this machine (a C compiler is part of the test setup)")


def _close(got, want, atol=1e-5, rtol=1e-5):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _same_grads(got, want, inputs):
    for a, b in zip(_grads(got, inputs), _grads(want, inputs), strict=True):
        assert b.abs().max() > 1e-3  # a gradient that could be wrong
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _ref_pre(x, w, alpha, bias, n, iterations):
    h_pre, h_post, h_res = reference.mhc_mappings(x, w, alpha, bias, n, iterations, EPS)
    return reference.mhc_aggregate(x, h_pre, n), h_post, h_res


@pytest.mark.parametrize("n,h,iterations,lead", [(2, 5, 4, (3, 5)), (4, 16, 20, (3, 5)), (4, 24, 20, (2, 16)),
                                                 (3, 9, 1, (1, 1))])
def test_pre_equals_reference_fp32(n, h, iterations, lead):
    args = _mapping_args(n, h, lead=lead)
    got = native_ops.mhc_pre(*args, n, iterations, EPS)
    want = _ref_pre(*args, n, iterations)
    _close(got, want)
    _same_grads(got, want, args)


def test_the_sinkhorn_gradient_alone_equals_autograd_of_the_plain_loop():
    """Only h_res used: the bias's res columns get sum_t d(loss)/d(logits), the custom Sinkhorn backward alone."""
    n, it = 4, 20
    args = _mapping_args(n, 8, lead=(37,), seed=5)
    got = native_ops.mhc_pre(*args, n, it, EPS)[2]
    want = _ref_pre(*args, n, it)[2]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0.0)
    (gb,), (rb,) = _grads(got, [args[3]]), _grads(want, [args[3]])
    assert rb[2 * n :].abs().max() > 1e-3 and gb[: 2 * n].abs().max() == 0
    assert (gb - rb).abs().max().item() <= 1e-6 * max(1.0, rb.abs().max().item())


@pytest.mark.parametrize("n,h,iterations", [(2, 5, 4), (4, 16, 20)])
def test_pre_mix_then_post_equals_reference_pre_post_res_fp32(n, h, iterations):
    args = _mapping_args(n, h)
    f = torch.randn(3, 5, h, generator=_gen(7)).requires_grad_()

    def native(x, w, alpha, bias, f):
        u, h_post, r = native_ops.mhc_pre_mix(x, w, alpha, bias, n, iterations, EPS)
        return u, native_ops.mhc_post(r, u * f, h_post, n)

    def ref(x, w, alpha, bias, f):
        u, h_post, h_res = _ref_pre(x, w, alpha, bias, n, iterations)
        return u, reference.mhc_post_res(x, u * f, h_post, h_res, n)

    got, want = native(*args, f), ref(*args, f)
    _close(got, want)
    _same_grads(got, want, [*args, f])


def test_pre_mix_saves_six_tensors_whatever_the_iterations_and_post_is_in_place():
    def saved(iterations):
        return _saved_count(native_ops.mhc_pre_mix, *_mapping_args(4, 8), 4, iterations, EPS)

    assert saved(1) == saved(20) == 6  # x, w, alpha, bias, the projection [T, M], the rsqrt [T]
    x, w, alpha, bias = _mapping_args(4, 8)
    u, h_post, r = native_ops.mhc_pre_mix(x, w, alpha, bias, 4, 3, EPS)
    assert r._base is None and native_ops.mhc_post(r, u, h_post, 4) is r


@pytest.mark.parametrize("n,h", [(1, 6), (4, 16), (4, 13)])
def test_learned_contraction_equals_reference_fp32(n, h):
    g = _gen(3)
    x = torch.randn(4, 3, n * h, generator=g).requires_grad_()
    head_fn = (torch.randn(n, n * h, generator=g) * 0.3).requires_grad_()
    base, scale = torch.randn(n, generator=g).requires_grad_(), (torch.rand(1, generator=g) + 0.5).requires_grad_()
    args = [x, head_fn, base, scale]
    got = native_ops.learned_output_contract(*args, n, EPS)
    want = reference.learned_output_contract(*args, n, EPS)
    _close((got,), (want,), atol=1e-6, rtol=1e-6)
    _same_grads(got, want, args)


def test_bf16_activations_keep_their_dtype():
    n, h = 4, 8
    x, w, alpha, bias = _mapping_args(n, h)
    xb = x.detach().bfloat16().requires_grad_()
    f = torch.randn(3, 5, h, generator=_gen(9), dtype=torch.bfloat16).requires_grad_()
    u, h_post, r = native_ops.mhc_pre_mix(xb, w, alpha, bias, n, 5, EPS)
    out = native_ops.mhc_post(r, f, h_post, n, torch.bfloat16)
    _, want_post, want_res = reference.mhc_mappings(xb.float(), w, alpha, bias, n, 5, EPS)
    want = reference.mhc_post_res(xb.float(), f.float(), want_post, want_res, n)
    assert u.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.bfloat16().float(), atol=2e-2, rtol=2e-2)
    gx, gf = torch.autograd.grad(out, [xb, f], torch.ones_like(out))
    assert gx.dtype == gf.dtype == torch.bfloat16


def test_bf16_post_gradients_equal_the_fp32_ones():
    """bf16 f and h_post go through fp32 copies in post's backward: their gradients equal those of fp32 inputs."""
    n, h = 4, 4096  # large enough that a freed copy's memory is reused by the next allocation
    g = _gen(21)
    r0 = torch.randn(2, 3, n * h, generator=g)
    f = torch.randn(2, 3, h, generator=g).bfloat16()
    post = torch.rand(2, 3, n, generator=g).bfloat16()

    def grads(dtype):
        fx, px = f.to(dtype).requires_grad_(), post.to(dtype).requires_grad_()
        out = native_ops.mhc_post(r0.clone(), fx, px, n)
        return [t.float() for t in torch.autograd.grad(out, [fx, px], torch.cos(r0))]

    for a, b in zip(grads(torch.bfloat16), grads(torch.float32), strict=True):
        torch.testing.assert_close(a, b.bfloat16().float(), atol=0, rtol=0)


def test_shapes_that_do_not_fit_raise_before_the_compiled_code_runs():
    x, w, alpha, bias = _mapping_args(2, 6)
    with pytest.raises(ValueError, match="not a multiple of n=5"):
        native_ops.mhc_pre(x, w, alpha, bias, 5, 4, EPS)
    with pytest.raises(ValueError, match="do not fit"):
        native_ops.mhc_pre_mix(x, w[:-1], alpha, bias, 2, 4, EPS)
    with pytest.raises(ValueError, match="do not fit"):
        native_ops.mhc_pre(x, w, alpha, bias[:-2], 2, 4, EPS)
    with pytest.raises(ValueError, match="do not fit"):
        native_ops.learned_output_contract(x, w[:2], torch.zeros(3), torch.ones(1), 3, EPS)


def test_non_contiguous_x_is_accepted():
    x, w, alpha, bias = _mapping_args(2, 6, lead=(5, 3))
    xt = x.detach().transpose(0, 1).requires_grad_()  # [3, 5, 12], not contiguous
    got = native_ops.mhc_pre(xt, w, alpha, bias, 2, 4, EPS)
    _close(got, _ref_pre(xt, w, alpha, bias, 2, 4))


def test_runs_are_bit_identical_and_the_baseline_build_equals_the_default_build(monkeypatch, tmp_path):
    """Per-token sums have a fixed order, so the 4-token (no AVX2 flag) build gives the same bits as the
    default build (8-token blocks with -mavx2 where the CPU has it) and every run repeats exactly."""
    n, h = 4, 24
    args = _mapping_args(n, h, lead=(2, 19))

    def run():
        u, h_post, r = native_ops.mhc_pre_mix(*args, n, 20, EPS)
        out = native_ops.mhc_post(r, u * 0.5, h_post, n)
        return (u, out, *_grads((u, out), args))

    first, again = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    monkeypatch.setenv("DSV4_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_ops, "library", lambda lib=native_build.build(flags=()): lib)
    baseline = run()
    assert all(torch.equal(a, b) for a, b in zip(first, baseline))


def test_results_do_not_depend_on_the_thread_count():
    """Calls long enough to be split over threads (>= 16 token blocks per thread) give the same bits on 1 and 2
    threads: each token's results are computed alone, in a fixed order."""
    if "-fopenmp" not in native_build.cpu_flags():
        pytest.skip("torch's GNU OpenMP is not loaded here: the kernels run one thread per call")
    n, h = 4, 16
    args = _mapping_args(n, h, lead=(3, 333), seed=13)
    f = torch.randn(3, 333, h, generator=_gen(14))

    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            u, h_post, r = native_ops.mhc_pre_mix(*args, n, 20, EPS)
            out = native_ops.mhc_post(r, u * f, h_post, n)
            y = native_ops.learned_output_contract(out, args[1][:n], args[3][:n], args[2][:1], n, EPS)
            return (u, out, y, *_grads((u, out, y), args))
        finally:
            torch.set_num_threads(before)

    one, two = run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))


# ---------------------------------------------------------------- dispatch and build


def test_auto_takes_the_compiled_kernels_on_cpu_fp32_and_the_torch_path_otherwise(monkeypatch):
    x, w, alpha, bias = _mapping_args(2, 4)
    name = lambda out: type(out[0].grad_fn).__name__  # noqa: E731
    assert name(kernels.mhc_pre_mix(x, w, alpha, bias, 2, 3, EPS)) == "_PreBackward"
    assert name(kernels.mhc_pre_mix(x, w, alpha, bias, 2, 3, EPS, impl="torch")) == "_MhcPreBackward"
    x64 = [t.detach().double().requires_grad_() for t in (x, w, alpha, bias)]
    assert name(kernels.mhc_pre_mix(*x64, 2, 3, EPS)) == "_MhcPreBackward"  # fp64 (gradcheck): torch path
    monkeypatch.setenv(native_build.SWITCH, "0")
    assert name(kernels.mhc_pre_mix(x, w, alpha, bias, 2, 3, EPS)) == "_MhcPreBackward"
    with pytest.raises(ValueError, match="DSV4_NATIVE_KERNELS=0"):
        kernels.mhc_pre_mix(x, w, alpha, bias, 2, 3, EPS, impl="native")


def test_a_model_layer_runs_the_same_numbers_on_both_cpu_paths(monkeypatch):
    """kernels.* with 'auto' (compiled) and with the switch off (fast_cpu) agree to fp32 rounding."""
    n, h = 4, 16
    args = _mapping_args(n, h, seed=11)
    f = torch.randn(3, 5, h, generator=_gen(12))

    def layer():
        u, h_post, mix = kernels.mhc_pre_mix(*args, n, 20, EPS)
        out = kernels.mhc_post(mix, u * f, h_post, n)
        return (out, *_grads(out, args))

    native = layer()
    monkeypatch.setenv(native_build.SWITCH, "0")
    _close(layer(), native)


def test_build_writes_into_the_cache_dir_and_reuses_it(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV4_CACHE_DIR", str(tmp_path))
    native_build.build()
    built = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].startswith("mhc_cpu-") and built[0].endswith(".so")  # no temporary left
    mtime = (tmp_path / "kernels" / built[0]).stat().st_mtime_ns
    native_build.build()
    assert (tmp_path / "kernels" / built[0]).stat().st_mtime_ns == mtime


def test_a_compiler_without_openmp_builds_a_one_thread_library(monkeypatch, tmp_path):
    if "-fopenmp" not in native_build.cpu_flags():
        pytest.skip("torch's GNU OpenMP is not loaded here: the build never asks for -fopenmp")
    cc = tmp_path / "cc-without-openmp"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "no OpenMP" >&2; exit 1; }; done\n'
                  f'exec {native_build._compiler()} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("DSV4_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(cc))
    lib = native_build.build()
    assert len(list((tmp_path / "cache" / "kernels").glob("*.so"))) == 1
    monkeypatch.setattr(native_ops, "library", lambda: lib)
    args = _mapping_args(4, 8, lead=(300,))
    _close(native_ops.mhc_pre(*args, 4, 5, EPS), _ref_pre(*args, 4, 5))


def test_a_failing_compiler_warns_once_and_falls_back_to_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV4_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # on PATH, exits 1
    native_build.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="compiled CPU mHC kernels are not available"):
            assert native_build.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native_build.library() is None  # cached: no second warning
            x, w, alpha, bias = _mapping_args(2, 4)
            out = kernels.mhc_pre_mix(x, w, alpha, bias, 2, 3, EPS)
        assert type(out[0].grad_fn).__name__ == "_MhcPreBackward"
        assert not any(tmp_path.rglob("*.so"))
        markers = list(tmp_path.rglob("*.failed"))  # later processes do not compile it again
        assert markers and all(m.read_text().startswith("false failed") for m in markers)
        stamps = [m.stat().st_mtime_ns for m in markers]
        with pytest.raises(RuntimeError, match="false failed"):
            native_build.build()
        assert [m.stat().st_mtime_ns for m in markers] == stamps and not any(tmp_path.rglob("*.tmp.so"))
    finally:
        native_build.library.cache_clear()
