"""One-shot GPU check of dsv4cli.kernels: correctness on CUDA at DSv4 shapes, then the benchmarks.

Written for a session that gets a GPU for a few minutes (budget: < 6 min on an H200, torch.compile included):

    python3 benchmarks/gpu_check.py --out $OUT/gpu.md       # through the device tool (no install needed)
    python benchmarks/gpu_check.py --dry-run                # CPU: same code path, tiny shapes, TRITON_INTERPRET=1

1. Correctness: every Triton op (the learned contraction on its default and its two-pass paths) forward and the gradient
   of every input vs the PyTorch reference on the same inputs, n = 4, h in {4096, 7168}, T = 3000 tokens
   (leading dims [2, 1500]), fp32 and bf16, with the tolerances of tests/test_kernels_triton.py. A float64
   reference is also run; when the fp32 reference bound is missed but Triton is at most 2x as far from float64
   as the fp32 reference is, the row says "PASS (fp64)" (the reference's own rounding, not a kernel error).
2. Benchmarks (bf16, n = 4, T = 16384, h in {4096, 7168}): Triton vs eager reference vs torch.compile(reference),
   forward and forward+backward, ideal bytes, GB/s, fraction of the measured copy bandwidth, speed-ups; plus
   the learned contraction's two-pass kernels (forward with 16 / 4 / 1 tokens per program) next to the default
   so the tuning constants in kernels/triton_ops.py can be set from numbers.
3. Training (benchmarks/gpu_train_check.py; needs `pip install -e .`, skipped with the reason otherwise): a
   timed training step of a mid-size spec (specs/model.toml on one GPU, 4 layers) with n = 1 and n = 4 streams:
   ms/step, tokens/s, MFU and the mHC overhead ratio; and the checkpoint keys of TE grouped-GEMM experts vs
   SequentialMLP experts (equal keys, shapes and offsets).
4. Prints everything and writes a markdown block (date, device, versions, command) for benchmarks/RESULTS.md.
Exit code: 0 when every correctness row (and expert-key check) passes, 1 otherwise (the benchmarks still run
and are written).
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before triton is imported: kernels decorated now run in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _import_kernels(from_tree: bool) -> None:
    """Make `dsv4cli.kernels` importable without `pip install -e .` (the GPU machine has torch and triton but
    not this project's other dependencies): the package dir `dsv4cli/` from the tree, and the top-level
    `kernels/` directory registered as `dsv4cli.kernels`, as pyproject's package-dir maps it."""
    if not from_tree:
        try:
            import dsv4cli.kernels  # noqa: F401  (installed)

            return
        except ImportError:
            pass
    sys.path.insert(0, str(ROOT))
    import dsv4cli

    spec = importlib.util.spec_from_file_location(
        "dsv4cli.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dsv4cli.kernels"] = mod
    spec.loader.exec_module(mod)
    dsv4cli.kernels = mod


_import_kernels(from_tree="--from-tree" in sys.argv)

from dsv4cli import kernels  # noqa: E402
from dsv4cli.kernels import reference  # noqa: E402

_spec = importlib.util.spec_from_file_location("dsv4_bench_kernels", Path(__file__).with_name("kernels.py"))
bench = importlib.util.module_from_spec(_spec)  # benchmarks/kernels.py (make_case, bench_case, copy_bandwidth)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)
_spec = importlib.util.spec_from_file_location("dsv4_gpu_train_check", Path(__file__).with_name("gpu_train_check.py"))
train_check = importlib.util.module_from_spec(_spec)  # benchmarks/gpu_train_check.py (train_rows, expert_key_rows)
sys.modules[_spec.name] = train_check
_spec.loader.exec_module(train_check)

OPS = bench.OPS
ITERATIONS, EPS = 20, 1e-6
# tests/test_kernels_triton.py TOL: activation dtype -> {tensor dtype: (rtol, atol)}
TOL = {
    torch.float32: {torch.float32: (1e-4, 1e-5)},
    torch.bfloat16: {torch.bfloat16: (2e-2, 2e-2), torch.float32: (1e-3, 1e-3)},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ helpers


def _ops():
    from dsv4cli.kernels.triton_ops import launch as triton_ops

    return triton_ops


@contextlib.contextmanager
def contraction_path(path: str):
    """'auto' (what the wrappers pick: the row path when the row fits) or 'two_pass[:BT]' (forced fallback)."""
    K = _ops()
    saved = (K.CONTRACT_ROW_MAX_ELEMS, K.CONTRACT_TWO_PASS_BT)
    try:
        if path.startswith("two_pass"):
            K.CONTRACT_ROW_MAX_ELEMS = 0
            if ":" in path:
                K.CONTRACT_TWO_PASS_BT = int(path.split(":")[1])
        yield
    finally:
        K.CONTRACT_ROW_MAX_ELEMS, K.CONTRACT_TWO_PASS_BT = saved


def make_inputs(op: str, lead: tuple, n: int, h: int, dtype: torch.dtype, device: str, seed: int = 0):
    """-> (inputs, call(fn_table_op, *inputs)) with activations in `dtype`, parameters fp32 (as the tests)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0, act=False):
        t = torch.randn(*shape, generator=g) * s
        return (t.to(dtype) if act else t).to(device)

    def unif(*shape, s=1.0):
        return (torch.rand(*shape, generator=g) * s).to(device)

    K, M = n * h, n * n + 2 * n
    if op == "mhc_mappings":
        ins = [rnd(*lead, K, act=True), rnd(M, K, s=K**-0.5), unif(3) + 0.5, rnd(M, s=0.5)]
        return ins, lambda f, *a: f(*a, n, ITERATIONS, EPS)
    if op == "sinkhorn":
        return [rnd(*lead, n, n, s=2.0)], lambda f, a: f(a, ITERATIONS, EPS)
    if op == "mhc_aggregate":
        return [rnd(*lead, K, act=True), unif(*lead, n)], lambda f, *a: f(*a, n)
    if op == "mhc_post_res":
        ins = [rnd(*lead, K, act=True), rnd(*lead, h, act=True), unif(*lead, n, s=2.0), unif(*lead, n, n)]
        return ins, lambda f, *a: f(*a, n)
    if op == "learned_output_contract":
        ins = [rnd(*lead, K, act=True), rnd(n, K, s=K**-0.5), rnd(n), torch.tensor([0.7], device=device)]
        return ins, lambda f, *a: f(*a, n, EPS)
    if op == "average_output_contract":
        return [rnd(*lead, K, act=True)], lambda f, a: f(a, n)
    raise KeyError(op)


def run_op(fn, call, inputs, upcast: bool = False, seed: int = 1):
    """Forward + backward with fixed random output gradients -> (outputs, input gradients)."""
    ins = [(t.double() if upcast else t).detach().clone().requires_grad_() for t in inputs]
    out = call(fn, *ins)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=g).to(device=o.device, dtype=o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [t.grad for t in ins]


def compare(got: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor, act_dtype: torch.dtype) -> dict:
    """Error of `got` vs the same-dtype reference (tolerance of the tests) and of both vs float64."""
    if got is None or got.shape != ref.shape or got.dtype != ref.dtype:
        return dict(ok=False, ratio=float("inf"), why=f"shape/dtype {None if got is None else (tuple(got.shape), got.dtype)}")
    rtol, atol = TOL[act_dtype][ref.dtype]
    err = (got.double() - ref.double()).abs()
    ratio = (err / (atol + rtol * ref.double().abs())).max().item()
    e_t64 = (got.double() - ref64).abs().max().item()
    e_r64 = (ref.double() - ref64).abs().max().item()
    finite = bool(torch.isfinite(got).all())
    ok = finite and ratio <= 1.0
    fp64 = finite and not ok and e_t64 <= 2.0 * e_r64 + 1e-12
    return dict(ok=ok, fp64=fp64, ratio=ratio, err=err.max().item(), e_t64=e_t64, e_r64=e_r64, why="" if finite else "non-finite")


def triton_fn(op: str):
    return lambda *a: getattr(kernels, op)(*a, impl="triton")


# ------------------------------------------------------------------------------------------ correctness


def correctness(args, device: str, log) -> list[dict]:
    rows = []
    for h in args.hidden:
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            for op in OPS:
                if op == "sinkhorn" and h != args.hidden[0]:
                    continue
                paths = ["auto"]
                if op == "learned_output_contract" and _ops().contract_row_meta(args.check_tokens, args.streams, h):
                    paths.append("two_pass")
                for path in paths:
                    name = op if path == "auto" else f"{op}[{path}]"
                    t0 = time.perf_counter()
                    row = dict(op=name, h=h, dtype=dname, status="FAIL", ratio=float("inf"), detail="")
                    try:
                        inputs, call = make_inputs(op, args.lead, args.streams, h, dtype, device)
                        with contraction_path(path):
                            outs_t, grads_t = run_op(triton_fn(op), call, inputs)
                        outs_r, grads_r = run_op(getattr(reference, op), call, inputs)
                        outs_64, grads_64 = run_op(getattr(reference, op), call, inputs, upcast=True)
                        checks = [(f"out{k}", a, b, c) for k, (a, b, c) in enumerate(zip(outs_t, outs_r, outs_64))]
                        checks += [(f"grad{k}", a, b, c) for k, (a, b, c) in enumerate(zip(grads_t, grads_r, grads_64))]
                        res = {tag: compare(a, b, c, dtype) for tag, a, b, c in checks}
                        worst_tag = max(res, key=lambda k: res[k]["ratio"])
                        row["ratio"] = res[worst_tag]["ratio"]
                        if all(r["ok"] for r in res.values()):
                            row["status"] = "PASS"
                        elif all(r["ok"] or r["fp64"] for r in res.values()):
                            row["status"] = "PASS (fp64)"
                        w = res[worst_tag]
                        row["detail"] = (
                            f"worst {worst_tag}: err/bound {w['ratio']:.3g}, |triton-fp64| {w.get('e_t64', float('nan')):.2e}, "
                            f"|ref-fp64| {w.get('e_r64', float('nan')):.2e} {w['why']}"
                        ).strip()
                    except Exception as exc:  # reported, the other checks still run
                        row["detail"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                        traceback.print_exc()
                    row["sec"] = time.perf_counter() - t0
                    rows.append(row)
                    log(f"check {row['status']:<11} {name:<36} h={h:<5} {dname} ({row['sec']:.1f}s) {row['detail']}")
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ benchmarks


def benchmarks(args, device: str, t_start: float, log) -> tuple[list[dict], float]:
    reps = args.reps or (20 if device == "cuda" else 1)
    warmup = 3 if device == "cuda" else 0  # CPU (dry run): the probe call inside bench_case is the warm-up
    bw = bench.copy_bandwidth(device, reps)
    log(f"copy bandwidth: {bw / 1e9:.1f} GB/s (torch copy_, read + write)")
    dtype = DTYPES[args.bench_dtype]
    compiled = {op: torch.compile(getattr(reference, op), dynamic=False) for op in OPS} if "compile" in args.impls else {}
    tables = {
        "triton": {op: triton_fn(op) for op in OPS},
        "eager": {op: getattr(reference, op) for op in OPS},
        "compile": compiled,
    }
    rows = []
    for h in args.hidden:
        for T in args.bench_tokens:
            for op in OPS:
                if op == "sinkhorn" and h != args.hidden[0]:
                    continue
                case = bench.make_case(op, T, args.streams, h, dtype, device)
                runs = [(impl, "auto") for impl in args.impls]
                if op == "learned_output_contract" and "triton" in args.impls:
                    fwd = "row (one read of x)" if _ops().contract_row_meta(T, args.streams, h) else "two-pass"
                    bwd = "row + dW" if _ops().contract_bwd_row_meta(T, args.streams, h) else "coef + proj_bwd"
                    log(f"learned_output_contract h={h}: the default triton path is forward {fwd}, backward {bwd}")
                    runs += [("triton", f"two_pass:{bt}") for bt in ((1,) if args.dry_run else (16, 4, 1))]
                for impl, path in runs:
                    label = impl if path == "auto" else f"triton[{path}]"
                    if impl == "compile" and time.perf_counter() - t_start > args.budget_s:
                        log(f"{op:<24} {T:>6} {h:>5} {label:<20} skipped: time budget {args.budget_s}s spent")
                        continue
                    try:
                        with contraction_path(path):
                            t_f, t_fb = bench.bench_case(case, tables[impl][op], device, warmup, reps)
                    except Exception as exc:
                        log(f"{op:<24} {T:>6} {h:>5} {label:<20} FAILED: {type(exc).__name__}: {exc}".splitlines()[0][:300])
                        continue
                    b_f, b_fb = case.bytes_fwd, case.bytes_fwd + case.bytes_bwd
                    r = dict(op=op, T=T, h=h, impl=label, t_f=t_f, t_fb=t_fb, b_f=b_f, b_fb=b_fb,
                             c_f=b_f / t_f / bw, c_fb=b_fb / t_fb / bw)  # fmt: skip
                    rows.append(r)
                    log(
                        f"{op:<24} {T:>6} {h:>5} {label:<20} fwd {t_f * 1e3:8.3f} ms  f+b {t_fb * 1e3:8.3f} ms  "
                        f"{b_f / t_f / 1e9:7.1f} / {b_fb / t_fb / 1e9:7.1f} GB/s  copy {100 * r['c_f']:5.1f}% / {100 * r['c_fb']:5.1f}%"
                    )
                del case
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows, bw


def speedups(rows: list[dict]) -> dict:
    """(op, T, h) -> {'eager': (fwd x, f+b x), 'compile': (...)} for the default Triton path."""
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["T"], r["h"]), {})[r["impl"]] = r
    out = {}
    for key, d in by.items():
        if "triton" not in d:
            continue
        t = d["triton"]
        out[key] = {o: (d[o]["t_f"] / t["t_f"], d[o]["t_fb"] / t["t_fb"]) for o in ("eager", "compile") if o in d}
    return out


# ------------------------------------------------------------------------------------------ report


def training(args, log) -> tuple[object, object]:
    """(train rows or why skipped, expert-key rows or why skipped); errors are reported, never raised."""
    out = []
    for name, fn in (("train", lambda: train_check.train_rows(args.dry_run, log)),
                     ("keys", lambda: train_check.expert_key_rows(log))):
        if args.skip_train:
            out.append("--skip-train")
            continue
        try:
            out.append(fn())
        except Exception as exc:  # e.g. megatron-core not installed on the GPU machine
            traceback.print_exc()
            out.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
            log(f"{name}: skipped: {out[-1]}")
    return out[0], out[1]


def markdown(args, device_name: str, check_rows, bench_rows, bw, elapsed: float, argv: list[str], train=None,
             keys=None) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import triton

    L = [
        f"### GPU check, {now}, {device_name}" + (" (DRY RUN: CPU interpreter, tiny shapes, not GPU figures)" if args.dry_run else ""),
        "",
        f"Command: `python benchmarks/gpu_check.py {' '.join(argv)}`; torch {torch.__version__}, triton {triton.__version__}, "
        f"CUDA {torch.version.cuda}, Python {platform.python_version()}; total {elapsed:.0f} s.",
        "",
        f"#### Correctness (n = {args.streams}, leading dims {list(args.lead)} = {args.check_tokens} tokens, "
        "tolerances of tests/test_kernels_triton.py)",
        "",
        "| op | h | dtype | result | worst err / bound | detail |",
        "|---|---|---|---|---|---|",
    ]
    for r in check_rows:
        L.append(f"| {r['op']} | {r['h']} | {r['dtype']} | {r['status']} | {r['ratio']:.3g} | {r['detail']} |")
    n_fail = sum(r["status"] == "FAIL" for r in check_rows)
    L += ["", f"{len(check_rows) - n_fail}/{len(check_rows)} passed.", ""]
    sp = speedups(bench_rows)
    L += [
        f"#### Benchmarks ({args.bench_dtype}, n = {args.streams}; copy bandwidth {bw / 1e9:.1f} GB/s, torch copy_, read + write)",
        "",
        "Median times (triton.testing.do_bench on CUDA). Ideal bytes: every input read once, every output written once "
        "(backward: saved inputs + output gradients read, input gradients written).",
        "",
        "| op | T | h | impl | fwd ms | fwd+bwd ms | MB fwd | MB f+b | GB/s fwd | GB/s f+b | copy % fwd | copy % f+b | triton vs eager (fwd / f+b) | triton vs compile (fwd / f+b) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in bench_rows:
        s = sp.get((r["op"], r["T"], r["h"]), {}) if r["impl"] == "triton" else {}
        fmt = lambda k: f"{s[k][0]:.2f}x / {s[k][1]:.2f}x" if k in s else ""  # noqa: E731
        L.append(
            f"| {r['op']} | {r['T']} | {r['h']} | {r['impl']} | {r['t_f'] * 1e3:.3f} | {r['t_fb'] * 1e3:.3f} | "
            f"{r['b_f'] / 1e6:.1f} | {r['b_fb'] / 1e6:.1f} | {r['b_f'] / r['t_f'] / 1e9:.1f} | {r['b_fb'] / r['t_fb'] / 1e9:.1f} | "
            f"{100 * r['c_f']:.1f}% | {100 * r['c_fb']:.1f}% | {fmt('eager')} | {fmt('compile')} |"
        )
    L += ["", "Targets (issue 3; tracked, not gated):", ""]
    for r in bench_rows:
        if r["impl"] == "triton" and r["op"] in ("learned_output_contract", "mhc_post_res"):
            verdict = "met" if r["c_fb"] >= 0.85 else "NOT met"
            L.append(f"- {r['op']} T={r['T']} h={r['h']}: fwd+bwd {100 * r['c_fb']:.1f}% of copy bandwidth (>= 85%: {verdict})")
    for (op, T, h), s in sp.items():
        if "compile" in s:
            verdict = "met" if min(s["compile"]) >= 1.3 else "NOT met"
            L.append(f"- {op} T={T} h={h}: {s['compile'][0]:.2f}x fwd, {s['compile'][1]:.2f}x fwd+bwd vs torch.compile (>= 1.3x: {verdict})")
    if train is not None:
        L += [""] + train_check.markdown(train, keys)
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes: checks the script runs")
    ap.add_argument("--out", type=Path, help="write the markdown block here (atomically)")
    ap.add_argument("--hidden", type=int, nargs="+", help="h values (default 4096 7168; dry run 12 7)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--lead", type=int, nargs="+", help="correctness leading dims (default 2 1500; dry run 2 3)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"], help="correctness dtypes")
    ap.add_argument("--bench-tokens", type=int, nargs="+", help="benchmark token counts (default 16384; dry run 8)")
    ap.add_argument("--bench-dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--impls", nargs="+", choices=["triton", "eager", "compile"], help="default triton eager compile (dry run: no compile)")
    ap.add_argument("--with-compile", action="store_true", help="dry run: also run torch.compile (slow on CPU)")
    ap.add_argument("--reps", type=int, help="timing repetitions (CPU default 1)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip the remaining torch.compile runs after this many seconds")
    ap.add_argument("--from-tree", action="store_true", help="import dsv4cli.kernels from this tree even if installed")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-train", action="store_true", help="skip the training step and expert-key checks")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device; use --dry-run for the CPU interpreter code-path check", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    args.hidden = args.hidden or ([12, 7] if args.dry_run else [4096, 7168])
    args.lead = tuple(args.lead or ([2, 3] if args.dry_run else [2, 1500]))
    args.check_tokens = 1
    for d in args.lead:
        args.check_tokens *= d
    args.bench_tokens = args.bench_tokens or ([8] if args.dry_run else [16384])
    if args.impls is None:
        args.impls = ["triton", "eager"] + (["compile"] if (not args.dry_run or args.with_compile) else [])
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)"

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    import triton

    log(f"device: {device_name}; torch {torch.__version__}; triton {triton.__version__}; dry run: {args.dry_run}")
    log(f"dsv4cli.kernels from {Path(kernels.__file__).parent}")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference in true fp32
    check_rows = [] if args.skip_check else correctness(args, device, log)
    bench_rows, bw = ([], float("nan")) if args.skip_bench else benchmarks(args, device, t_start, log)
    train, keys = training(args, log)
    md = markdown(args, device_name, check_rows, bench_rows, bw, time.perf_counter() - t_start, argv, train, keys)
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(md)
        tmp.replace(args.out)
        log(f"wrote {args.out}")
    n_fail = sum(r["status"] == "FAIL" for r in check_rows)
    key_fail = sum(r["ok"] is False for r in keys) if isinstance(keys, list) else 0
    log(f"done: {len(check_rows) - n_fail}/{len(check_rows)} correctness checks passed"
        + (f"; {key_fail} expert-key check(s) FAILED" if key_fail else ""))
    return 1 if n_fail or key_fail else 0


if __name__ == "__main__":
    sys.exit(main())
