"""One mHC sub-layer on CPU (mhc_pre_mix + mhc_post, forward + backward) per path, and the contraction.

    python benchmarks/mhc_sublayer.py                    # bench-mhc dims: T = 1024 tokens, n = 4, h = 128
    python benchmarks/mhc_sublayer.py --tokens 4096 --hidden 256 --reps 50

Paths: "native" (the compiled kernels, kernels/mhc_cpu.c), "torch" (kernels/fast_cpu.py) and the plain
reference (autograd; reference.mhc_mappings + mhc_aggregate + mhc_post_res). Rows alternate path by path
within each repetition, so the load of a shared machine falls on all alike; each cell is the median over the
repetitions of wall ms per call. Prints the torch / native ratio. Uses torch's default threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dsv4cli import kernels
from dsv4cli.kernels import reference

EPS = 1e-6


def _sublayer(impl: str, x, w, alpha, bias, f, n: int, iterations: int):
    """-> a callable running forward + backward of one sub-layer on `impl` (x' = H_post f + H_res^T x)."""

    def run():
        if impl == "reference":
            h_pre, h_post, h_res = reference.mhc_mappings(x, w, alpha, bias, n, iterations, EPS)
            u = reference.mhc_aggregate(x, h_pre, n)
            out = reference.mhc_post_res(x, u * f, h_post, h_res, n)
        else:
            u, h_post, mix = kernels.mhc_pre_mix(x, w, alpha, bias, n, iterations, EPS, impl=impl)
            out = kernels.mhc_post(mix, u * f, h_post, n, impl=impl)
        out.backward(torch.ones_like(out))

    return run


def _contract(impl: str, x, head_fn, base, scale, n: int):
    def run():
        if impl == "reference":
            y = reference.learned_output_contract(x, head_fn, base, scale, n, EPS)
        else:
            y = kernels.learned_output_contract(x, head_fn, base, scale, n, EPS, impl=impl)
        y.backward(torch.ones_like(y))

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    T, n, h = args.tokens, args.streams, args.hidden
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, n * h, generator=g).requires_grad_()
    w = (torch.randn(n * n + 2 * n, n * h, generator=g) * 0.05).requires_grad_()
    alpha, bias = torch.ones(3, requires_grad=True), torch.zeros(n * n + 2 * n, requires_grad=True)
    f = torch.randn(T, h, generator=g)
    head_fn, base = (torch.randn(n, n * h, generator=g) * 0.05).requires_grad_(), torch.zeros(n, requires_grad=True)
    scale = torch.ones(1, requires_grad=True)
    impls = ["native", "torch", "reference"]
    cases = {
        "sub-layer": {i: _sublayer(i, x, w, alpha, bias, f, n, args.iterations) for i in impls},
        "contraction": {i: _contract(i, x, head_fn, base, scale, n) for i in impls},
    }
    print(f"T={T} n={n} h={h} iterations={args.iterations} threads={torch.get_num_threads()} reps={args.reps} "
          "(forward + backward, median wall ms per call)")
    for name, fns in cases.items():
        times = {i: [] for i in impls}
        for fn in fns.values():
            fn()  # warm-up (builds the compiled kernels on first use)
        for _ in range(args.reps):
            for i, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
        med = {i: statistics.median(t) * 1e3 for i, t in times.items()}
        cells = "  ".join(f"{i} {m:7.3f}" for i, m in med.items())
        print(f"{name:<12} {cells}  torch/native {med['torch'] / med['native']:.2f}x  "
              f"reference/native {med['reference'] / med['native']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
