"""The mHC overhead contract: `dsv4 train` with streams n = 1 vs n = 4, median step_time_s ratio (<= 1.6).

    python benchmarks/mhc_overhead.py                          # specs/bench-mhc.toml, 3 x (n=1, n=4)
    python benchmarks/mhc_overhead.py --repeats 5 --json
    python benchmarks/mhc_overhead.py --spec specs/tiny.toml --set train.log_interval=1 --set train.steps=40

Every run is the real command, `dsv4 train SPEC --set model.mhc.streams=N` (one process, in-process
training), in a fresh temporary run directory; its metrics.jsonl holds one `step_time_s` per step
(batch, forward, backward, optimizer step; the spec needs `train.log_interval = 1`). The first
`--skip` steps of each run are dropped (first-touch allocations), the rest are pooled per stream
count over the repeats. Runs alternate (1, 4, 1, 4, ...) so that the load of a shared machine falls
on both alike; the load average is printed before and after. Exit 1 when the ratio is above `--limit`.

With `--cpu` each round also runs `benchmarks/train.py` for each stream count (the same spec and
training step in one fresh process, mock data) and records the median *thread CPU time* per step: on
a shared machine it leaves out the time slices other processes take, which wall time cannot. Its
ratio is printed beside the contract's (wall) ratio; the exit status follows the wall ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def dsv4_command() -> list[str]:
    """The `dsv4` console script of this interpreter's environment (PATH as a fallback)."""
    local = Path(sys.executable).parent / "dsv4"
    if local.exists():
        return [str(local)]
    found = shutil.which("dsv4")
    if found is None:
        raise SystemExit("mhc_overhead: no `dsv4` command next to this Python or on PATH (pip install -e .)")
    return [found]


def step_times(metrics_path: Path, skip: int) -> list[float]:
    """metrics.jsonl -> step_time_s of every per-step training record after the first `skip` steps."""
    times = []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "step_time_s" in rec and rec.get("step", 0) > skip:
            times.append(float(rec["step_time_s"]))
    return times


def run_once(spec: str, streams: int, overrides: list[str], skip: int) -> list[float]:
    """One `dsv4 train` run with `model.mhc.streams = streams` -> its step times (s)."""
    with tempfile.TemporaryDirectory(prefix=f"mhc-overhead-n{streams}-") as tmp:
        sets = [f"model.mhc.streams={streams}", f"checkpoint.dir={json.dumps(tmp)}", *overrides]
        cmd = [*dsv4_command(), "train", spec, *[a for s in sets for a in ("--set", s)]]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"mhc_overhead: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        times = step_times(Path(tmp) / "metrics.jsonl", skip)
    if not times:
        raise SystemExit("mhc_overhead: no per-step step_time_s in metrics.jsonl (set train.log_interval = 1)")
    return times


def cpu_step_time(spec: str, streams: int, overrides: list[str], steps: int) -> float:
    """Median thread CPU time per training step (s) of benchmarks/train.py for `streams`, in a fresh process."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "train.py"), "--spec", spec, "--streams", str(streams),
           "--warmup", "3", "--steps", str(steps), "--json", *[a for s in overrides for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"mhc_overhead: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])[0]["cpu_step_time_s"])


def summarize(times: dict[int, list[list[float]]]) -> dict:
    """{streams: [run step times, ...]} -> medians per stream count and last-over-first ratio."""
    order = list(times)
    med = {n: statistics.median([t for run in runs for t in run]) for n, runs in times.items()}
    run_meds = {n: [round(statistics.median(run), 4) for run in runs] for n, runs in times.items()}
    return {
        "median_step_time_s": med,
        "run_medians_s": run_meds,
        "ratio": med[order[-1]] / med[order[0]],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(REPO / "specs" / "bench-mhc.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4], help="stream counts; ratio = last / first")
    ap.add_argument("--repeats", type=int, default=3, help="runs per stream count, interleaved")
    ap.add_argument("--skip", type=int, default=2, help="leading steps of each run left out")
    ap.add_argument("--limit", type=float, default=1.6, help="exit 1 when the ratio is above this")
    ap.add_argument("--cpu", action="store_true", help="also measure thread CPU time per step (benchmarks/train.py)")
    ap.add_argument("--cpu-steps", type=int, default=15, help="timed steps of each --cpu measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    start = time.time()
    times: dict[int, list[list[float]]] = {n: [] for n in args.streams}
    cpu: dict[int, list[list[float]]] = {n: [] for n in args.streams}
    for _ in range(args.repeats):
        for n in args.streams:
            times[n].append(run_once(args.spec, n, args.overrides, args.skip))
            if args.cpu:
                cpu[n].append([cpu_step_time(args.spec, n, args.overrides, args.cpu_steps)])
    result = summarize(times)
    if args.cpu:
        result["cpu"] = summarize(cpu)
    result.update(
        spec=args.spec, overrides=args.overrides, repeats=args.repeats, skip=args.skip,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)), wall_s=round(time.time() - start, 1),
        machine=f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        loadavg_before=[round(v, 2) for v in load_before], loadavg_after=[round(v, 2) for v in os.getloadavg()],
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
    )  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        first, last = args.streams[0], args.streams[-1]
        print(f"spec {args.spec} {' '.join(args.overrides)} | {args.repeats} interleaved runs per stream count, "
              f"first {args.skip} steps of each left out | {result['date']} | {result['machine']}")
        print(f"load average before {result['loadavg_before']} after {result['loadavg_after']} "
              f"(OMP_NUM_THREADS={result['omp_num_threads']})")
        for n in args.streams:
            print(f"streams {n}: median step_time_s {result['median_step_time_s'][n]:.4f} "
                  f"(run medians {result['run_medians_s'][n]})")
        if args.cpu:
            c = result["cpu"]
            for n in args.streams:
                print(f"streams {n}: median thread CPU per step {c['median_step_time_s'][n]:.4f} s "
                      f"(per round {c['run_medians_s'][n]})")
            print(f"thread CPU ratio n={last} / n={first}: {c['ratio']:.3f}")
        print(f"ratio n={last} / n={first}: {result['ratio']:.3f} (limit {args.limit})")
    return 0 if result["ratio"] <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
