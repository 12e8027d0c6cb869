"""Triton kernels (interpreter mode on CPU) equal the PyTorch reference, forward and every gradient.

TRITON_INTERPRET=1 is set here, before dsv4cli.kernels.triton_ops is imported (triton reads it when a
kernel is decorated). Tolerances, per element |triton - reference| <= atol + rtol * |reference|:
- fp32 inputs: rtol 1e-4, atol 1e-5 (outputs and all gradients; observed errors ~1e-7);
- bf16 activations (fp32 parameters): rtol 2e-2, atol 2e-2 on bf16 tensors (one or two bf16 ulps after
  different fp32 summation orders), rtol 1e-3, atol 1e-3 on fp32 tensors (h_pre/h_post/h_res, parameter grads).
The default suite runs a representative subset; the full matrix n in {1, 2, 4, 8} x odd h x {fp32, bf16} is slow.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from dsv4cli import kernels  # noqa: E402
from dsv4cli.kernels import reference  # noqa: E402
from dsv4cli.kernels import triton_ops  # noqa: E402

if not triton_ops.INTERPRETED:  # imported earlier in this process without the env var: re-decorate every module
    for _name in [m for m in sys.modules if m.startswith("dsv4cli.kernels.triton_ops")]:
        del sys.modules[_name]
    triton_ops = importlib.import_module("dsv4cli.kernels.triton_ops")
launch = triton_ops.launch

TOL = {
    torch.float32: {torch.float32: (1e-4, 1e-5)},
    torch.bfloat16: {torch.bfloat16: (2e-2, 2e-2), torch.float32: (1e-3, 1e-3)},
}
OPS = ["mhc_mappings", "sinkhorn", "mhc_aggregate", "mhc_post_res", "learned_output_contract", "average_output_contract"]


def _inputs(op: str, n: int, h: int, dtype: torch.dtype, lead=(2, 3), iterations: int = 3, seed: int = 0):
    """-> (list of input tensors, call(impl, *tensors)) for one op; activations in `dtype`, parameters fp32."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0, act=False):
        t = torch.randn(*shape, generator=g) * s
        return t.to(dtype) if act else t

    x = rnd(*lead, n * h, act=True)
    eps = 1e-6
    if op == "mhc_mappings":
        m = n * n + 2 * n
        ins = [x, rnd(m, n * h, s=0.3), torch.rand(3, generator=g) + 0.5, rnd(m, s=0.5)]
        return ins, lambda impl, *a: kernels.mhc_mappings(*a, n, iterations, eps, impl=impl)
    if op == "sinkhorn":
        return [rnd(*lead, n, n, s=2.0)], lambda impl, a: kernels.sinkhorn(a, iterations, eps, impl=impl)
    if op == "mhc_aggregate":
        return [x, torch.rand(*lead, n, generator=g)], lambda impl, *a: kernels.mhc_aggregate(*a, n, impl=impl)
    if op == "mhc_post_res":
        ins = [x, rnd(*lead, h, act=True), torch.rand(*lead, n, generator=g) * 2, torch.rand(*lead, n, n, generator=g)]
        return ins, lambda impl, *a: kernels.mhc_post_res(*a, n, impl=impl)
    if op == "learned_output_contract":
        ins = [x, rnd(n, n * h, s=0.3), rnd(n), torch.tensor([0.7])]
        return ins, lambda impl, *a: kernels.learned_output_contract(*a, n, eps, impl=impl)
    if op == "average_output_contract":
        return [x], lambda impl, a: kernels.average_output_contract(a, n, impl=impl)
    raise KeyError(op)


def _run(call, impl, inputs, seed=1):
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    out = call(impl, *ins)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return outs, [t.grad for t in ins]


def _assert_close(name, got, want, act_dtype):
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != reference {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    rtol, atol = TOL[act_dtype][want.dtype]
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{name}: max abs err {err.max().item():.3e} exceeds atol {atol} + rtol {rtol} * |ref|"


def check_op(op, n, h, dtype, **kw):
    inputs, call = _inputs(op, n, h, dtype, **kw)
    outs_t, grads_t = _run(call, "triton", inputs)
    outs_r, grads_r = _run(call, "torch", inputs)
    for k, (a, b) in enumerate(zip(outs_t, outs_r)):
        _assert_close(f"{op} n={n} h={h} {dtype} output {k}", a, b, dtype)
    for k, (a, b) in enumerate(zip(grads_t, grads_r)):
        assert a is not None, f"{op}: no gradient for input {k}"
        _assert_close(f"{op} n={n} h={h} {dtype} grad of input {k}", a, b, dtype)


# ------------------------------------------------------------------------------------------ default subset


@pytest.mark.parametrize("op", OPS)
def test_triton_equals_reference_n4_odd_h_fp32(op):
    check_op(op, 4, 5, torch.float32)


@pytest.mark.parametrize("op", ["mhc_mappings", "mhc_post_res", "learned_output_contract"])
def test_triton_equals_reference_n3_bf16(op):
    check_op(op, 3, 7, torch.bfloat16)


@pytest.mark.parametrize("op", ["mhc_mappings", "mhc_aggregate", "mhc_post_res", "learned_output_contract"])
def test_triton_multi_block_loops(op, monkeypatch):
    """Small block caps force several token blocks, K/h chunks and dW splits with ragged tails."""
    monkeypatch.setattr(launch, "MAX_BLOCK_T", 16)
    monkeypatch.setattr(launch, "MAX_BLOCK_K", 16)
    monkeypatch.setattr(launch, "MAX_BLOCK_H", 16)
    monkeypatch.setattr(launch, "PROJ_BWD_SPLITS", 2)
    check_op(op, 2, 19, torch.float32, lead=(37,))


@pytest.mark.parametrize("path", ["row", "row_multi_token", "row_fwd_only", "two_pass", "two_pass_small_block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_contraction_paths(path, dtype, monkeypatch):
    """Every kernel path of the learned contraction, outputs and all gradients: whole rows on chip forward
    and backward (one read of x; one or several tokens per program), rows on chip in the forward only (the
    backward's two-kernel path, as at n = 4, h = 7168), and the two-pass forward for rows too wide for that
    (16 tokens per program with tl.dot, 2 without)."""
    n, h, T = 3, 11, 9
    if path.startswith("two_pass"):
        monkeypatch.setattr(launch, "CONTRACT_ROW_MAX_ELEMS", 0)
        if path == "two_pass_small_block":  # < 16 tokens per program: the projection without tl.dot
            monkeypatch.setattr(launch, "CONTRACT_TWO_PASS_BT", 2)
        assert launch.contract_row_meta(T, n, h) is None and launch.contract_bwd_row_meta(T, n, h) is None
    else:
        monkeypatch.setattr(launch, "MIN_PROGRAMS", 2 if path == "row_multi_token" else 512)
        if path == "row_fwd_only":
            monkeypatch.setattr(launch, "CONTRACT_BWD_ROW_MAX_ELEMS", 0)
        meta = launch.contract_row_meta(T, n, h)
        assert meta is not None and (meta["BT"] > 1) == (path == "row_multi_token"), meta
        assert (launch.contract_bwd_row_meta(T, n, h) is None) == (path == "row_fwd_only")
    check_op("learned_output_contract", n, h, dtype, lead=(T,))


def test_triton_sinkhorn_20_iterations_backward():
    check_op("sinkhorn", 4, 1, torch.float32, iterations=20, lead=(3,))


def test_triton_handles_non_contiguous_and_leading_dims():
    n, h = 2, 6
    base = torch.randn(3, 2, 4, n * h * 2)
    x = base[..., ::2]  # non-contiguous [3, 2, 4, n*h]
    assert not x.is_contiguous()
    w = torch.randn(n * n + 2 * n, n * h) * 0.3
    alpha, bias = torch.tensor([0.5, 0.6, 0.7]), torch.randn(n * n + 2 * n)
    got = kernels.mhc_mappings(x, w, alpha, bias, n, 3, 1e-6, impl="triton")
    want = reference.mhc_mappings(x, w, alpha, bias, n, 3, 1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    hp = torch.rand(3, 4, 2, n).transpose(1, 2)  # non-contiguous [3, 2, 4, n]
    torch.testing.assert_close(
        kernels.mhc_aggregate(x, hp, n, impl="triton"), reference.mhc_aggregate(x, hp, n), rtol=1e-5, atol=1e-6
    )


def test_triton_rejects_bad_inputs_clearly():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="not a multiple of n=3"):
        kernels.mhc_aggregate(x, torch.rand(4, 3), 3, impl="triton")
    with pytest.raises(ValueError, match="float64"):
        kernels.mhc_aggregate(x.double(), torch.rand(4, 2).double(), 2, impl="triton")
    with pytest.raises(ValueError, match="proj_weight"):
        kernels.mhc_mappings(x, torch.randn(7, 10), torch.ones(3), torch.zeros(8), 2, 3, 1e-6, impl="triton")
    with pytest.raises(ValueError, match="h_res must be"):
        kernels.mhc_post_res(x, torch.randn(4, 5), torch.rand(4, 2), torch.rand(4, 3, 3), 2, impl="triton")


def test_auto_on_cpu_uses_reference_even_under_interpreter():
    x = torch.randn(2, 8)
    assert kernels.resolve_impl("auto", x) == "torch"
    assert kernels.resolve_impl("triton", x) == "triton"


# ------------------------------------------------------------------------------------------ full matrix (slow)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("h", [5, 13])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("op", OPS)
def test_triton_matrix(op, n, h, dtype):
    check_op(op, n, h, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("op", [op for op in OPS if op != "sinkhorn"])
def test_triton_dsv4_like_hidden_2560(op):
    """A production-like non-power-of-two h (2560 = 10 blocks of 256) with a ragged token count."""
    check_op(op, 4, 2560, torch.bfloat16, lead=(5,))
