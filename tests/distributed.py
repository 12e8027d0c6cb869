"""Multi-process test harness: run a Python function under `torchrun --nproc_per_node N` on CPU (gloo).

    from distributed import run_distributed
    results = run_distributed("test_model_distributed:worker", {"case": "tp2"}, nproc=2)
    # -> [rank0_result, rank1_result], each the JSON-serialisable dict the function returned

The target is "module:function" importable from tests/ (or the repo root); it is called as
`function(args: dict) -> dict` in every rank after torchrun set RANK/WORLD_SIZE/MASTER_*; it sets up
its own process groups (e.g. dsv4cli.build.initialize_parallel). Each rank's return value is written
to OUT/rank{r}.json; a failing rank's traceback is written there too and re-raised in the caller as
DistributedRunError with the captured output tail. Workers run with OMP_NUM_THREADS=1, gloo, and a
free port, so tests can run in parallel with other work on a small machine.

This file is also the worker entry point: `python -m torch.distributed.run ... tests/distributed.py
--target MOD:FN --args ARGS.json --out DIR`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Optional

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


class DistributedRunError(RuntimeError):
    """torchrun failed or a rank raised; the message carries the rank errors and the output tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(
    target: str,
    args: Optional[dict] = None,
    nproc: int = 2,
    timeout: float = 600.0,
    env: Optional[dict] = None,
) -> list[dict]:
    """Run `target(args)` in `nproc` torchrun ranks; return the per-rank result dicts (rank order)."""
    with tempfile.TemporaryDirectory(prefix="dsv4-dist-") as tmp:
        out = Path(tmp)
        args_file = out / "args.json"
        args_file.write_text(json.dumps(args or {}))
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            str(Path(__file__).resolve()),
            "--target", target, "--args", str(args_file), "--out", str(out),
        ]
        child_env = dict(os.environ)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            child_env.pop(key, None)
        child_env.update(
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT), child_env.get("PYTHONPATH", "")]),
            PYTHONUNBUFFERED="1",
            TORCH_CPP_LOG_LEVEL="ERROR",
        )
        child_env.update(env or {})
        try:
            proc = subprocess.run(cmd, env=child_env, cwd=str(REPO_ROOT), capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            tail = ((e.stdout or "") + (e.stderr or ""))[-4000:] if isinstance(e.stdout, str) else ""
            raise DistributedRunError(f"torchrun timed out after {timeout}s\n{tail}") from None
        results, errors = [], []
        for rank in range(nproc):
            f = out / f"rank{rank}.json"
            if not f.exists():
                errors.append(f"rank {rank}: no result file")
                continue
            data = json.loads(f.read_text())
            if "__error__" in data:
                errors.append(f"rank {rank}: ...{data['__error__'][-2500:]}")
            results.append(data)
        if proc.returncode != 0 or errors:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise DistributedRunError(
                f"torchrun exit {proc.returncode}\n" + "\n".join(errors) + f"\n--- output tail ---\n{tail}"
            )
        return results


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--args", required=True)
    parser.add_argument("--out", required=True)
    ns = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    out = Path(ns.out) / f"rank{rank}.json"
    try:
        module_name, fn_name = ns.target.split(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        result: Any = fn(json.loads(Path(ns.args).read_text()))
        out.write_text(json.dumps(result if result is not None else {}))
        return 0
    except BaseException:  # noqa: BLE001 - report every failure to the caller
        out.write_text(json.dumps({"__error__": traceback.format_exc()}))
        return 1


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
