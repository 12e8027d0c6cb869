"""Peak memory of `dsv4 import-hf` and `dsv4 export-hf` on a checkpoint of a few hundred MB (issue 14):
each command runs as its own process; its peak RSS (`os.wait4`'s ru_maxrss) minus the peak RSS of a
process that only imports the same modules must stay under 3 x the largest tensor + 300 MB.

The model is tests/hf_tiny.py's, widened where the bytes of a real MoE checkpoint are (vocabulary,
hidden size, experts), written by HF's save_pretrained."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from hf_tiny import hf_model  # noqa: E402  (after importorskip)

MB = 1024**2
WIDE = dict(vocab_size=32000, hidden_size=512, n_routed_experts=10, moe_intermediate_size=1024)
"""~325 MB in fp32: embedding and head 62.5 MB each, 3 layers x 10 experts x 3 x 2 MB."""
IMPORTS = ("import torch, safetensors.torch, torch.distributed.checkpoint, megatron.core; "
           "import dsv4cli.cli, dsv4cli.infer.import_hf, dsv4cli.infer.export_hf, dsv4cli.build.parallel, "
           "dsv4cli.build.model, dsv4cli.ckpt.save, dsv4cli.infer.region_reader")
"""What the commands import before their work starts (the baseline process imports just that)."""


LAUNCHER = ("import json, os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(p.pid, 0); "
            "open(sys.argv[1], 'w').write(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))")
"""Runs a command and writes [exit code, its peak RSS in KiB]. Linux carries the peak RSS of the
address space a process replaces on exec into ru_maxrss, so the measured command is started by this
small process, not by pytest's large one."""


def _peak_rss(args: list[str], log) -> tuple[int, str]:
    """Run `python ARGS` (stdout, stderr to files beside `log`) -> (its peak RSS in bytes, its stdout);
    fails on a non-zero exit."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        subprocess.run([sys.executable, "-c", LAUNCHER, f"{log}.rss", sys.executable, *args], stdout=out, stderr=err,
                       check=True)
    code, kib = json.loads(open(f"{log}.rss").read())
    assert code == 0, open(f"{log}.err").read()[-2000:]
    return kib * 1024, open(f"{log}.out").read()


def _command_peak(log, *args: str) -> tuple[int, dict]:
    """Peak RSS of `dsv4 ARGS --json` and its JSON result."""
    run = "import sys; from dsv4cli.cli import main; sys.argv = ['dsv4', *sys.argv[1:]]; main()"
    peak, out = _peak_rss(["-c", run, *args, "--json"], log)
    return peak, json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """Write the wide model, measure the baseline, import-hf and export-hf (MB); print the figures."""
    from dsv4cli.infer.safetensors_io import STORED_BYTES, tensor_sources

    root = tmp_path_factory.mktemp("memory")
    hf_model(**WIDE).save_pretrained(root / "hf")
    sources = tensor_sources(root / "hf")
    size = sum(STORED_BYTES[s.dtype] * math.prod(s.shape) for s in sources.values())
    largest = max(STORED_BYTES[s.dtype] * math.prod(s.shape) for s in sources.values())
    assert size >= 300 * MB
    baseline, _ = _peak_rss(["-c", IMPORTS], root / "baseline")
    imported, result = _command_peak(root / "import", "import-hf", str(root / "hf"), str(root / "imported"))
    assert result["bytes"] == size
    exported, result = _command_peak(root / "export", "export-hf", str(root / "imported"), str(root / "exported"))
    assert (result["bytes"], result["tensors"]) == (size, len(sources))
    figures = {"checkpoint": size / MB, "largest_tensor": largest / MB, "baseline": baseline / MB,
               "import_above_baseline": (imported - baseline) / MB, "export_above_baseline": (exported - baseline) / MB,
               "bound": (3 * largest + 300 * MB) / MB}
    print("peak memory (MB):", json.dumps({k: round(v, 1) for k, v in figures.items()}))
    return figures


@pytest.mark.slow
def test_export_peak_memory_stays_under_three_largest_tensors_plus_300_mb(measured):
    assert measured["export_above_baseline"] < measured["bound"], measured


@pytest.mark.slow
def test_import_peak_memory_stays_under_three_largest_tensors_plus_300_mb(measured):
    assert measured["import_above_baseline"] < measured["bound"], measured
