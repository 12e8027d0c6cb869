"""Training throughput of mHC: tokens/s with streams n = 1 vs n = 4 (same dims), printed as a ratio.

    OMP_NUM_THREADS=2 python benchmarks/train.py                 # tiny dims of specs/tiny.toml
    python benchmarks/train.py --spec specs/model.toml --steps 20 --set parallel.tp=1 ...
    python benchmarks/train.py --streams 1 2 4 --json

Each variant runs the real training step (megatron DDP + optimizer + forward_backward_func,
mock data) in this process: `--warmup` untimed steps, then `--steps` timed ones; the median
step time gives tokens/s. Only the stream count differs between variants (MTP, contraction
and every other setting come from the spec). One process; on a GPU machine it uses CUDA.
The measured contract (`dsv4 train` itself, separate interleaved runs, median step_time_s of
metrics.jsonl, specs/bench-mhc.toml): benchmarks/mhc_overhead.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(spec_path: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """-> {"streams", "tokens_per_s", "step_time_s", "cpu_step_time_s", "params", "final_loss"} for one variant.

    `cpu_step_time_s`: the median of this thread's CPU time per step (`time.thread_time`): unlike wall
    time it does not count the time slices other processes of a shared machine take (with one intra-op
    thread it is the step's whole CPU time; with more, only this thread's share)."""
    import torch
    from megatron.core import parallel_state as ps

    from dsv4cli.spec.load import load_spec
    from dsv4cli.train.data import build_sources, microbatches
    from dsv4cli.build.parallel import destroy_parallel
    from dsv4cli.train.runtime import build_runtime
    from dsv4cli.train.step import ModelParts, train_step

    spec = load_spec(spec_path, overrides + ["data.source=\"mock\"", f"train.steps={warmup + steps}"], world_size=1)
    rt = build_runtime(spec)
    try:
        data = build_sources(spec)
        t = spec.train
        parts = ModelParts.collect(rt)
        times, cpu_times, loss = [], [], float("nan")
        for i in range(warmup + steps):
            batches = microbatches(data.train, i * t.global_batch_size, t.global_batch_size, t.micro_batch_size,
                                   ps.get_data_parallel_rank(), rt.dims.dp)
            t0, c0 = time.perf_counter(), time.thread_time()
            loss = train_step(rt, parts, batches, i).values.loss  # the step `dsv4 train` runs
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.thread_time() - c0)
        step = statistics.median(times)
        return {
            "streams": spec.model.mhc.streams,
            "tokens_per_s": t.global_batch_size * spec.model.seq_length / step,
            "step_time_s": step,
            "cpu_step_time_s": statistics.median(cpu_times),
            "params": sum(p.numel() for c in rt.chunks for p in c.parameters()),
            "final_loss": loss,
        }
    finally:
        destroy_parallel()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(REPO / "specs" / "tiny.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    results = [measure(args.spec, args.overrides + [f"model.mhc.streams={n}"], args.warmup, args.steps)
               for n in args.streams]
    base = results[0]
    for r in results:
        r["ratio_vs_first"] = r["tokens_per_s"] / base["tokens_per_s"]
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"spec {args.spec} {' '.join(args.overrides)} | {args.warmup} warmup + {args.steps} timed steps (median)")
    print(f"{'streams':>7} {'params':>10} {'step s':>8} {'tokens/s':>10} {'vs n=' + str(base['streams']):>8}")
    for r in results:
        print(f"{r['streams']:>7} {r['params']:>10,} {r['step_time_s']:>8.4f} {r['tokens_per_s']:>10,.0f} "
              f"{r['ratio_vs_first']:>8.3f}")
    if len(results) > 1:
        last = results[-1]
        print(f"n={last['streams']} runs at {last['ratio_vs_first']:.3f}x the tokens/s of n={base['streams']} "
              f"(mHC overhead {100 * (1 / last['ratio_vs_first'] - 1):.0f}% step time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
