"""`dsv4 convert-ckpt` at disk speed: wall time vs `cp -r` of the same checkpoint, copy and --link.

    python benchmarks/convert.py                      # >= 1 GiB synthetic legacy checkpoint under runs/bench-convert
    python benchmarks/convert.py --gib 4 --dir /scratch/bench --keep

Builds a synthetic legacy (average-contraction) checkpoint with per-parameter Adam state in
Megatron's stored layout (dsv4cli/ckpt/synthetic.py; no model is built), reads it once so the
page cache is warm, then times in one run: `cp -r SRC`, `dsv4 convert-ckpt SRC DST` and
`dsv4 convert-ckpt SRC DST --link` (each a fresh process, in --reps rounds of every command, medians;
outputs deleted between runs, `sync` before each, untimed) and prints the ratios and each process's
peak memory (max RSS). The convert-ckpt rows include the process start; they run without torch
(dsv4cli/ckpt/dcp_pickle.py, new_entries.py). For comparison: the same command forced onto the
torch path (DCP's reader and `dcp.save`, as before the torch-free path), the start-up alone (Python
and the CLI's imports; and `import torch.distributed.checkpoint`, what the torch path needs) and
`convert_checkpoint()` timed inside a process after its imports ("conversion only").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def bench_spec(gib: float):
    """A legacy n = 4 spec whose checkpoint (fp32 weights + two Adam moments) is about `gib` GiB."""
    from dsv4cli.spec.estimate import param_inventory
    from dsv4cli.spec.schema import Spec

    def spec(layers: int):
        return Spec.model_validate({
            "name": "bench-convert",
            "model": {"num_layers": layers, "hidden_size": 1024, "num_attention_heads": 8, "ffn_hidden_size": 2816,
                      "vocab_size": 32000, "seq_length": 256, "mhc": {"streams": 4},
                      "contraction": {"mode": "average"}, "mtp": {"depth": 1}},
            "train": {"micro_batch_size": 1, "global_batch_size": 1},
        })

    layers = 1
    while True:
        s = spec(layers)
        nbytes = 3 * 4 * sum(_numel(shape) for _, shape in param_inventory(s))
        if nbytes >= gib * GIB:
            return s, nbytes
        layers += 1


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def warm(root: Path) -> None:
    """Read every file once (page cache warm for every timed command)."""
    buf = bytearray(1 << 20)  # small: children forked from this process count its resident memory
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def timed(argv: list[str]) -> tuple[float, float, float]:
    """Run argv -> (wall seconds, peak RSS in MiB, CPU seconds (user + system) of that process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # Linux: ru_maxrss in KiB


_ONLY = "convert-ckpt, conversion only (after imports)"

_IN_PROCESS = """
import sys, time, json
from dsv4cli.ckpt.convert import convert_checkpoint
from dsv4cli.ckpt.integrity import check_checkpoint
t0 = time.perf_counter()
check_checkpoint(sys.argv[1], loading=True, torch_free=True)
convert_checkpoint(sys.argv[1], sys.argv[2])
print(json.dumps(time.perf_counter() - t0))
"""


# The CLI with the torch-free writer switched off: the torch path (DCP's reader, dcp.save, pickle.dump).
_TORCH_PATH = """
import sys
from dsv4cli.ckpt import convert
from dsv4cli.cli import app
convert._entry_writer = lambda info, tensors: None
app(sys.argv[1:])
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.25, help="checkpoint size to build (default 1.25 GiB)")
    ap.add_argument("--dir", type=Path, default=REPO / "runs" / "bench-convert")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the source checkpoint for another run")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--describe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    src, work = args.dir / "legacy", args.dir / "out"
    if args.describe or args.build_only:
        spec, _ = bench_spec(args.gib)
    if args.describe:
        print(json.dumps({"layers": spec.model.num_layers, "hidden": spec.model.hidden_size}))
        return 0
    if args.build_only:
        from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

        write_synthetic_checkpoint(src, spec, iteration=10)
        return 0
    if not (src / "latest_checkpointed_iteration.txt").is_file():
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.perf_counter()
        # in a child: this process stays small, so the children it forks report their own peak memory
        subprocess.run([sys.executable, __file__, "--build-only", "--gib", str(args.gib), "--dir", str(args.dir)],
                       check=True)
        print(f"built {src} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    # The spec is made in a child too: a child forked from this process counts this process's resident
    # memory in its peak (max RSS), so this one stays a bare interpreter.
    desc = json.loads(subprocess.run([sys.executable, __file__, "--describe", "--gib", str(args.gib)],
                                     check=True, capture_output=True, text=True).stdout)
    size = tree_bytes(src)
    warm(src)
    dsv4 = [sys.executable, "-m", "dsv4cli.cli"]
    runs = {
        "cp -r": lambda dst: ["cp", "-r", str(src), str(dst)],
        "convert-ckpt": lambda dst: dsv4 + ["convert-ckpt", str(src), str(dst)],
        "convert-ckpt --link": lambda dst: dsv4 + ["convert-ckpt", str(src), str(dst), "--link"],
        "convert-ckpt, torch path": lambda dst: [sys.executable, "-c", _TORCH_PATH, "convert-ckpt", str(src), str(dst)],
        "start-up (python, CLI imports)": lambda dst: [sys.executable, "-c",
                                                     "import dsv4cli.cli, dsv4cli.ckpt.convert, dsv4cli.ckpt.integrity"],
        "start-up (import torch.distributed.checkpoint)": lambda dst: [sys.executable, "-c",
                                                                     "import torch.distributed.checkpoint"],
    }
    load_before = os.getloadavg()
    walls = {name: [] for name in [*runs, _ONLY]}
    rss = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(args.reps):  # rounds: every command once per round, so a shared machine's load hits all alike
        for name, make in runs.items():
            shutil.rmtree(work, ignore_errors=True)
            os.sync()  # untimed: the previous command's dirty pages are not written back during this one
            wall, peak, used = timed(make(work))
            walls[name].append(wall)
            rss[name].append(peak)
            cpu[name].append(used)
        shutil.rmtree(work, ignore_errors=True)
        os.sync()
        out = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(src), str(work)], check=True,
                             capture_output=True, text=True).stdout
        walls[_ONLY].append(json.loads(out.strip().splitlines()[-1]))
    results = {name: {"wall_s": statistics.median(w), "peak_rss_mib": max(rss[name]) if name in rss else float("nan"),
                      "cpu_s": statistics.median(cpu[name]) if name in cpu else float("nan"), "runs": w}
               for name, w in walls.items()}
    loads = [round(v, 2) for v in (*load_before, *os.getloadavg())]
    shutil.rmtree(work, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    base = results["cp -r"]["wall_s"]
    for r in results.values():
        r["vs_cp"] = r["wall_s"] / base
    if args.json:
        print(json.dumps({"bytes": size, "results": results, "loadavg_before_after": loads}, indent=2))
        return 0
    print(f"checkpoint: {size / GIB:.2f} GiB ({desc['layers']} layers, h {desc['hidden']}, n = 4, "
          f"fp32 + Adam moments), page cache warm; median of {args.reps} interleaved rounds; "
          f"load average before {loads[:3]} after {loads[3:]}")
    print(f"{'command':<48} {'wall s':>8} {'vs cp -r':>9} {'cpu s':>7} {'peak RSS MiB':>13}")
    for name, r in results.items():
        print(f"{name:<48} {r['wall_s']:>8.3f} {r['vs_cp']:>8.2f}x {r['cpu_s']:>7.2f} {r['peak_rss_mib']:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
