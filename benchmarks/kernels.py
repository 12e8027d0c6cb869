"""Benchmark the mHC / contraction ops: Triton vs eager reference vs torch.compile(reference).

For each op and shape it prints forward and forward+backward time, the bytes an ideal kernel moves
(each input read once, each output written once), achieved GB/s and the fraction of the device's
measured copy bandwidth; then `ratio:` lines (fraction of copy bandwidth per impl, and Triton's
speed-up over eager and torch.compile when those ran). On CPU only the torch path runs (Triton needs
a GPU; the interpreter is for correctness only) and the script says so.

    python benchmarks/kernels.py                     # DSv4 shapes: n=4, h in {4096, 7168}, T 4096..32768
    python benchmarks/kernels.py --quick             # no torch.compile, small token counts (CI, CPU)
    python benchmarks/kernels.py --quick --tokens 64 --hidden 256
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from dsv4cli import kernels
from dsv4cli.kernels import reference

OPS = ["mhc_mappings", "sinkhorn", "mhc_aggregate", "mhc_post_res", "learned_output_contract", "average_output_contract"]
ITERATIONS, EPS = 20, 1e-6


@dataclass
class Case:
    """Inputs of one op at one shape plus the ideal byte counts of its forward and backward."""

    op: str
    inputs: list[torch.Tensor]
    fn: Callable[..., object]  # fn(impl_callable_table, *inputs)
    bytes_fwd: int
    bytes_bwd: int


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_case(op: str, T: int, n: int, h: int, dtype: torch.dtype, device: str) -> Case:
    g = torch.Generator(device=device).manual_seed(0)  # on the device: CPU randn of a 16k x 28k x would take seconds

    def act(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    def par(*shape, s=1.0):
        return torch.randn(*shape, generator=g, device=device) * s

    def unif(*shape):
        return torch.rand(*shape, generator=g, device=device)

    K, M = n * h, n * n + 2 * n
    x = act(T, K)
    f32 = 4
    if op == "mhc_mappings":
        ins = [x, par(M, K, s=K**-0.5), torch.full((3,), 0.01, device=device), par(M, s=0.1)]
        outs = T * M * f32
        return Case(op, ins, lambda F, *a: F(*a, n, ITERATIONS, EPS), _nbytes(*ins) + outs, _nbytes(*ins) + 2 * outs)
    if op == "sinkhorn":
        z = par(T, n, n)
        return Case(op, [z], lambda F, a: F(a, ITERATIONS, EPS), 2 * _nbytes(z), 3 * _nbytes(z))
    if op == "mhc_aggregate":
        w = unif(T, n)
        y = T * h * x.element_size()
        return Case(op, [x, w], lambda F, *a: F(*a, n), _nbytes(x, w) + y, 2 * _nbytes(x, w) + y)
    if op == "mhc_post_res":
        ins = [x, act(T, h), unif(T, n), unif(T, n, n)]
        return Case(op, ins, lambda F, *a: F(*a, n), _nbytes(*ins) + _nbytes(x), 2 * _nbytes(*ins) + _nbytes(x))
    if op == "learned_output_contract":
        ins = [x, par(n, K, s=K**-0.5), par(n), torch.ones(1, device=device)]
        y = T * h * x.element_size()
        return Case(op, ins, lambda F, *a: F(*a, n, EPS), _nbytes(*ins) + y, 2 * _nbytes(*ins) + y)
    if op == "average_output_contract":
        y = T * h * x.element_size()
        return Case(op, [x], lambda F, a: F(a, n), _nbytes(x) + y, _nbytes(x) + y)
    raise KeyError(op)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    """Median seconds per call (CUDA: triton.testing.do_bench, CUDA events, L2 flushed between calls)."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(100, 5 * reps), return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device: str, reps: int) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    numel = (256 if device == "cuda" else 32) * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    sec = time_it(lambda: dst.copy_(src), device, 2, reps)
    return 2 * src.numel() * src.element_size() / sec


def impl_table(impl: str, compiled: dict[str, Callable]) -> dict[str, Callable]:
    if impl == "eager":
        return {op: getattr(reference, op) for op in OPS}
    if impl == "compile":
        return compiled
    return {op: (lambda op: lambda *a: getattr(kernels, op)(*a, impl="triton") if op != "average_output_contract"
                 else kernels.average_output_contract(*a, impl="triton"))(op) for op in OPS}  # fmt: skip


def bench_case(case: Case, F: Callable, device: str, warmup: int, reps: int) -> tuple[float, float]:
    """-> (forward seconds, forward+backward seconds)."""

    def fwd():
        with torch.no_grad():
            case.fn(F, *case.inputs)

    leaves = [t.detach().clone().requires_grad_() for t in case.inputs]
    probe = case.fn(F, *leaves)
    probe = probe if isinstance(probe, tuple) else (probe,)
    grads = [torch.ones_like(o) for o in probe]
    del probe

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        out = case.fn(F, *leaves)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

    return time_it(fwd, device, warmup, reps), time_it(fwd_bwd, device, warmup, reps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip torch.compile; small token counts")
    ap.add_argument("--tokens", type=int, nargs="+", help="token counts (default 4096..32768, --quick: 256)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[4096, 7168], help="hidden sizes h")
    ap.add_argument("--streams", type=int, default=4, help="n, the number of residual streams")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--ops", nargs="+", choices=OPS, default=OPS)
    ap.add_argument("--reps", type=int, help="timed repetitions (default GPU 20, CPU 3)")
    ap.add_argument(
        "--impls", nargs="+", choices=["triton", "eager", "compile"],
        help="override the implementations (default GPU: triton eager compile; CPU: eager [compile]); "
        "triton on CPU needs TRITON_INTERPRET=1 and only checks the code path, its times mean nothing",
    )  # fmt: skip
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = args.tokens or ([256] if args.quick else [4096, 8192, 16384, 32768])
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    reps = args.reps or (20 if device == "cuda" else 3)
    warmup = 3 if device == "cuda" else 1
    impls = ["eager"] if device == "cpu" else ["triton", "eager"]
    if not args.quick:
        impls.append("compile")
    if args.impls:
        impls = [i for i in args.impls if not (args.quick and i == "compile")]
    if device == "cpu":
        print("device: cpu -- benchmarking the torch path only (Triton kernels need a GPU; figures are not GPU figures)")
        if "triton" in impls:
            print("note: triton on cpu runs in the interpreter: a code-path check, not a timing")
    else:
        print(f"device: {torch.cuda.get_device_name()}")
    if args.quick:
        print("quick mode: torch.compile skipped")
    bw = copy_bandwidth(device, reps)
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s (torch copy_, read + write)")
    compiled = {op: torch.compile(getattr(reference, op), dynamic=False) for op in OPS} if "compile" in impls else {}

    header = f"{'op':<24} {'T':>6} {'h':>5} {'impl':<8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'MB fwd':>8} {'MB f+b':>8} {'GB/s fwd':>9} {'GB/s f+b':>9} {'copy% fwd':>9} {'copy% f+b':>9}"  # noqa: E501
    print(header)
    ratios: list[str] = []
    for h in args.hidden:
        for T in tokens:
            for op in args.ops:
                if op == "sinkhorn" and h != args.hidden[0]:
                    continue  # independent of h
                case = make_case(op, T, args.streams, h, dtype, device)
                results = {}
                for impl in impls:
                    try:
                        t_f, t_fb = bench_case(case, impl_table(impl, compiled)[op], device, warmup, reps)
                    except Exception as exc:  # a failing impl is reported, the others still run
                        print(f"{op:<24} {T:>6} {h:>5} {impl:<8} FAILED: {type(exc).__name__}: {exc}".splitlines()[0])
                        continue
                    b_f, b_fb = case.bytes_fwd, case.bytes_fwd + case.bytes_bwd
                    results[impl] = (t_f, t_fb, b_f / t_f, b_fb / t_fb)
                    print(
                        f"{op:<24} {T:>6} {h:>5} {impl:<8} {t_f * 1e3:>9.3f} {t_fb * 1e3:>11.3f} {b_f / 1e6:>8.1f} "
                        f"{b_fb / 1e6:>8.1f} {b_f / t_f / 1e9:>9.1f} {b_fb / t_fb / 1e9:>9.1f} "
                        f"{100 * b_f / t_f / bw:>8.1f}% {100 * b_fb / t_fb / bw:>8.1f}%"
                    )
                for impl, (t_f, t_fb, g_f, g_fb) in results.items():
                    line = f"ratio: {op} T={T} h={h} {impl}: fwd {g_f / bw:.3f}, fwd+bwd {g_fb / bw:.3f} of copy bandwidth"
                    if impl == "triton":
                        for other in ("eager", "compile"):
                            if other in results:
                                o = results[other]
                                line += f"; vs {other}: fwd {o[0] / t_f:.2f}x, fwd+bwd {o[1] / t_fb:.2f}x"
                    ratios.append(line)
    print("\n".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
