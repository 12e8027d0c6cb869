"""End to end: `dsv4 train` (average contraction) -> `dsv4 convert-ckpt` -> `dsv4 eval` equal -> resume training."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SPEC = """\
name = "ckpt-e2e"
[model]
num_layers = 2
hidden_size = 32
num_attention_heads = 2
ffn_hidden_size = 64
vocab_size = 256
vocab_pad_multiple = 8
seq_length = 32
[model.mhc]
streams = 4
[model.contraction]
mode = "average"
[model.mtp]
depth = 1
[train]
steps = 4
micro_batch_size = 2
global_batch_size = 2
warmup_steps = 1
log_interval = 2
eval_interval = 0
eval_batches = 2
[data]
source = "builtin"
[checkpoint]
dir = "{run}"
"""


def dsv4(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200", NO_COLOR="1")
    p = subprocess.run([sys.executable, "-m", "dsv4cli.cli", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, f"dsv4 {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr[-3000:]}"
    return p


def hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_trained_legacy_checkpoint_converts_evaluates_equal_and_resumes(tmp_path):
    from dsv4cli.ckpt.tensors import load_all_tensors

    spec = tmp_path / "avg.toml"
    spec.write_text(SPEC.format(run=tmp_path / "run_avg"))
    dsv4("train", str(spec), cwd=tmp_path)
    legacy = tmp_path / "run_avg"
    before = hashes(legacy)

    out = dsv4("convert-ckpt", str(legacy), str(tmp_path / "run_learned"), "--verify", "--json", cwd=tmp_path)
    result = json.loads(out.stdout)
    assert result["status"] == "converted" and result["optimizer"] == "per-parameter"
    assert {c["check"] for c in result["verify"]["checks"]} == {"contraction", "model"}
    assert result["verify"]["ok"], result["verify"]
    assert hashes(legacy) == before, "the source checkpoint changed"

    learned = ["--set", 'model.contraction.mode="learned"']
    loss_avg = json.loads(dsv4("eval", str(spec), "--load", str(legacy), "--json", cwd=tmp_path).stdout)
    loss_new = json.loads(dsv4("eval", str(spec), *learned, "--load", str(tmp_path / "run_learned"), "--json",
                               cwd=tmp_path).stdout)
    assert abs(loss_avg["loss"] - loss_new["loss"]) <= 1e-5, (loss_avg, loss_new)
    for a, b in zip(loss_avg["mtp_losses"], loss_new["mtp_losses"]):
        assert abs(a - b) <= 1e-5

    resumed = tmp_path / "run_resumed"
    p = dsv4("train", str(spec), *learned, "--set", f'checkpoint.load="{tmp_path / "run_learned"}"',
             "--set", f'checkpoint.dir="{resumed}"', "--set", "train.steps=6", cwd=tmp_path)
    assert "resumed from" in p.stdout + p.stderr and "step 4" in p.stdout + p.stderr
    assert (resumed / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    after = load_all_tensors(resumed / "iter_0000006")
    assert after["decoder.hc_head_fn"].abs().max() > 0, "the learned contraction did not train after resume"
    assert after["optimizer.state.exp_avg.decoder.hc_head_fn"].abs().max() > 0
