"""benchmarks/gpu_check.py (the one-shot GPU check) runs its whole code path on CPU with --dry-run.

The dry run executes the same correctness checks and benchmarks as on a GPU, at tiny shapes, with the Triton
kernels in the interpreter, so a session that gets a GPU for a few minutes does not lose it to a crash.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPS = ["mhc_mappings", "sinkhorn", "mhc_aggregate", "mhc_post_res", "learned_output_contract", "average_output_contract"]


def test_gpu_check_dry_run_passes_every_check_and_writes_markdown(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--hidden", "7", "--from-tree",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    md = out.read_text()
    assert md.startswith("### GPU check, ") and "DRY RUN" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    for op in OPS:
        for dt in ("fp32", "bf16"):
            assert any(re.match(rf"\| {op} \| 7 \| {dt} \| PASS \|", r) for r in rows), (op, dt, md)
        for impl in ("triton", "eager"):
            assert any(r.startswith(f"| {op} | 8 | 7 | {impl} | ") for r in rows), (op, impl, md)
    # both forward paths of the learned contraction are checked, and the two-pass variants are timed
    assert any(r.startswith("| learned_output_contract[two_pass] | 7 | bf16 | PASS |") for r in rows), md
    assert any(r.startswith("| learned_output_contract | 8 | 7 | triton[two_pass:1] | ") for r in rows), md
    assert "FAIL" not in md and "FAILED" not in proc.stdout
    # --from-tree: imported the way the GPU machine (no `pip install -e .`) does
    assert f"dsv4cli.kernels from {ROOT / 'kernels'}" in proc.stdout, proc.stdout[:2000]
    assert re.search(r"^(\d+)/\1 passed\.$", md, re.M), md
    # the training step (n = 1 vs 4) and the expert checkpoint-key check run too (TE's side skipped on CPU)
    for n in (1, 4):
        assert re.search(rf"^\| tiny\.toml \| {n} \| [\d,]+ \| [\d.]+ \| [\d,]+ \| n/a \| [\d.]+ \|$", md, re.M), md
    assert re.search(r"^mHC overhead \(n = 4 step time / n = 1\): [\d.]+$", md, re.M), md
    assert "| SequentialMLP keys = expert_checkpoint_key mapping | PASS | 24 expert weights |" in md
    assert "skipped: grouped GEMM needs Transformer Engine" in md


def test_gpu_check_uses_the_test_tolerances():
    spec = importlib.util.spec_from_file_location("gpu_check_mod", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    import torch

    src = (ROOT / "tests" / "test_kernels_triton.py").read_text()
    block = re.search(r"^TOL = (\{.*?^\})", src, re.S | re.M)
    assert block, "TOL not found in tests/test_kernels_triton.py"
    assert mod.TOL == eval(block.group(1), {"torch": torch})  # noqa: S307 - our own test file
    assert set(mod.OPS) == set(OPS)
