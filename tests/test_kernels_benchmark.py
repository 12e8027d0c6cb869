"""benchmarks/kernels.py runs in CI-friendly time on CPU and prints per-op ratio lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPS = ["mhc_mappings", "sinkhorn", "mhc_aggregate", "mhc_post_res", "learned_output_contract", "average_output_contract"]


def _run(*args: str, interpret: bool = False) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_benchmark_quick_cpu_prints_ratio_lines_for_every_op():
    out = _run("--quick", "--tokens", "64")
    assert "benchmarking the torch path only" in out
    assert "torch.compile skipped" in out
    assert "copy bandwidth:" in out
    ratio_lines = [line for line in out.splitlines() if line.startswith("ratio: ")]
    for op in OPS:
        for h in (4096, 7168) if op != "sinkhorn" else (4096,):
            assert any(line.startswith(f"ratio: {op} T=64 h={h} eager:") for line in ratio_lines), (op, h, out)
    assert "FAILED" not in out


@pytest.mark.slow  # the default suite covers this path through tests/test_kernels_gpu_check.py (all ops, bench_case)
def test_benchmark_triton_code_path_under_interpreter():
    out = _run(
        "--quick", "--tokens", "16", "--hidden", "24", "--reps", "1", "--impls", "eager", "triton",
        "--ops", "mhc_aggregate", "learned_output_contract", interpret=True,
    )  # fmt: skip
    assert "FAILED" not in out, out
    for op in ("mhc_aggregate", "learned_output_contract"):
        assert any(
            line.startswith(f"ratio: {op} T=16 h=24 triton:") and "vs eager" in line for line in out.splitlines()
        ), out


@pytest.mark.slow
def test_benchmark_triton_code_path_all_ops_under_interpreter():
    out = _run("--quick", "--tokens", "16", "--hidden", "24", "--reps", "1", "--impls", "eager", "triton", interpret=True)
    assert "FAILED" not in out, out
    for op in OPS:
        assert any(line.startswith(f"ratio: {op} T=16 h=24 triton:") for line in out.splitlines()), (op, out)
