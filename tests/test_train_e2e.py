"""End-to-end `dsv4 train` / `dsv4 eval` on CPU (slow) and the helpers other tests/test_train_*.py import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SMALL_SPEC = """\
name = "small"

[model]
num_layers = 2
hidden_size = 32
num_attention_heads = 4
ffn_hidden_size = 64
vocab_size = 256
seq_length = 32

[model.mhc]
streams = 4

[model.mtp]
depth = 1

[train]
steps = 4
micro_batch_size = 2
global_batch_size = 4
lr = 3e-3
min_lr = 3e-4
warmup_steps = 1
log_interval = 1
eval_interval = 2
eval_batches = 1

[checkpoint]
dir = "run"
"""


def write_small_spec(tmp_path: Path, extra: str = "") -> Path:
    """specs for tests: h=32, 2 layers, 4 streams, MTP depth 1, seq 32, 4 steps of 4 sequences."""
    path = Path(tmp_path) / "small.toml"
    path.write_text(SMALL_SPEC + extra)
    return path


def metrics(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss (the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def cli(*args: str):
    """Run `dsv4 ARGS` in-process with CliRunner; -> result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from dsv4cli.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


# --------------------------------------------------------------------------- end-to-end tests

REPO = Path(__file__).resolve().parent.parent


def save_model_only_checkpoint(spec_path: Path, run_dir: Path) -> Path:
    """A model-only checkpoint at iteration 0 (fresh weights of the spec, no optimizer state)."""
    from dsv4cli.spec.load import load_spec, spec_to_toml
    from dsv4cli.ckpt.save import TrainProgress, save_checkpoint
    from dsv4cli.build.parallel import destroy_parallel
    from dsv4cli.train.runtime import build_runtime

    spec = load_spec(spec_path)
    rt = build_runtime(spec, with_optimizer=False)
    try:
        return save_checkpoint(run_dir, rt.chunks, None, None, TrainProgress(), spec_to_toml(spec),
                               rt.dims.checkpoint_layout())
    finally:
        destroy_parallel()


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", NO_COLOR="1", COLUMNS="200")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def signal_when(proc, ready, sig, timeout: float = 240, poll: float = 0.05) -> None:
    """Send `sig` to `proc` once `ready()` holds (or it exited, or `timeout` s passed), wait for it to
    end; kill it if it is still running when this returns or raises."""
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(poll)
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_tiny_spec_trains_with_clearly_decreasing_loss(tmp_path):
    run = tmp_path / "tiny"
    r = cli("train", str(REPO / "specs" / "tiny.toml"), "--set", "train.steps=40", "--set", "train.warmup_steps=5",
            "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=4",
            "--set", "train.log_interval=5", "--set", "train.eval_interval=20",
            "--set", f"checkpoint.dir={run}", "--set", "checkpoint.interval=20")
    assert r.exit_code == 0, r.output
    recs = metrics(run)
    assert [x["step"] for x in recs] == [5, 10, 15, 20, 25, 30, 35, 40]
    first, last = recs[0]["loss"], sum(x["loss"] for x in recs[-2:]) / 2
    assert first > 4.0 and last < first - 1.5, [x["loss"] for x in recs]
    evals = [x["eval_loss"] for x in recs if "eval_loss" in x]
    assert len(evals) == 2 and evals[1] < evals[0] < 5.0, evals
    assert all(len(x["mtp_losses"]) == 1 for x in recs)
    assert "eval_loss" in r.stdout
    for it in (20, 40):
        d = run / f"iter_{it:07d}"
        assert (d / ".metadata").is_file() and (d / "dsv4_spec.toml").is_file() and (d / "dsv4_meta.json").is_file()
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "40"


@pytest.mark.slow
def test_resume_after_exit_interval_is_bit_exact(tmp_path):
    spec = write_small_spec(tmp_path, "")
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--set", "train.steps=6", "--set", "train.eval_interval=3"]
    assert cli("train", str(spec), *common, "--set", f"checkpoint.dir={straight}").exit_code == 0
    first = cli("train", str(spec), *common, "--set", f"checkpoint.dir={split}", "--set", "train.exit_interval=3")
    assert first.exit_code == 0, first.output
    assert "exit_interval" in first.stdout
    assert sorted(losses(split)) == [1, 2, 3]
    second = cli("train", str(spec), *common, "--set", f"checkpoint.dir={split}")
    assert second.exit_code == 0, second.output
    assert "resumed from" in second.stdout
    a, b = metrics(straight), metrics(split)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for key in ("loss", "mtp_losses", "grad_norm", "lr", "eval_loss"):
            assert x.get(key) == y.get(key), (x["step"], key, x.get(key), y.get(key))

    # The model may not change on resume; training settings may.
    bad = cli("train", str(spec), "--set", "train.steps=8", "--set", f"checkpoint.dir={split}",
              "--set", "model.mhc.streams=2", "--set", "model.hidden_size=64")
    assert bad.exit_code == 2, bad.output
    assert "model.mhc.streams" in bad.stderr and "model.hidden_size" in bad.stderr and "Traceback" not in bad.output
    more = cli("train", str(spec), "--set", "train.steps=7", "--set", "train.lr=1e-3", "--set", f"checkpoint.dir={split}")
    assert more.exit_code == 0, more.output
    assert max(losses(split)) == 7

    # dsv4 eval reproduces the held-out loss the run logged at its last step.
    ev = cli("eval", str(spec), "--load", str(straight), "--batches", "1", "--json")
    assert ev.exit_code == 0, ev.output
    out = json.loads(ev.stdout.strip().splitlines()[-1])
    assert set(out) == {"loss", "mtp_losses", "tokens"} and len(out["mtp_losses"]) == 1
    assert out["tokens"] == 4 * 32
    assert abs(out["loss"] - a[-1]["eval_loss"]) <= 1e-6, (out["loss"], a[-1]["eval_loss"])
    mism = cli("eval", str(spec), "--load", str(straight), "--set", "model.hidden_size=64", "--set", "model.mtp.depth=2")
    assert mism.exit_code == 2
    assert "missing: mtp.layers.1." in mism.stderr and " mis-shaped (" in mism.stderr  # summarised: counts,
    assert "more (see all with --verbose)" in mism.stderr  # the first few keys, how to see all


@pytest.mark.slow
def test_model_only_checkpoint_resumes_with_a_fresh_optimizer(tmp_path):
    spec = write_small_spec(tmp_path)
    init = save_model_only_checkpoint(spec, tmp_path / "init")
    assert init.name == "iter_0000000"
    r = cli("train", str(spec), "--set", "train.steps=2", "--set", f"checkpoint.load={tmp_path / 'init'}",
            "--set", f"checkpoint.dir={tmp_path / 'run'}")
    assert r.exit_code == 0, r.output
    assert "fresh optimizer" in r.stdout
    assert sorted(losses(tmp_path / "run")) == [1, 2]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from dsv4cli.train import runtime

    spec = write_small_spec(tmp_path)
    real = runtime.loss_func
    calls = {"n": 0}

    def poisoned(loss_mask, output_tensor):
        calls["n"] += 1
        loss, info = real(loss_mask, output_tensor)
        if calls["n"] > 6:  # steps 1-3 are fine (2 micro-batches each), step 4 is not
            loss = loss * float("nan")
            info = {"lm loss": loss.detach().clone()}
        return loss, info

    monkeypatch.setattr(runtime, "loss_func", poisoned)
    run = tmp_path / "run"
    r = cli("train", str(spec), "--set", "train.steps=6", "--set", "train.eval_interval=0",
            "--set", "checkpoint.interval=2", "--set", f"checkpoint.dir={run}")
    assert r.exit_code == 1
    assert "non-finite loss at step 4" in r.stderr and "iter_0000002" in r.stderr
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (run / "iter_0000004").exists()


@pytest.mark.slow
def test_sigterm_mid_run_leaves_a_loadable_checkpoint(tmp_path):
    spec = write_small_spec(tmp_path)
    run = tmp_path / "run"
    log = tmp_path / "train.log"  # a file, not a pipe: an unread pipe that fills up would block the trainer
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsv4cli.cli", "train", str(spec), "--set", "train.steps=100000",
             "--set", "train.eval_interval=0", "--set", f"checkpoint.dir={run}"],
            cwd=str(REPO), env=_env(), stdout=sink, stderr=subprocess.STDOUT, text=True)
        signal_when(proc, lambda: (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 2, signal.SIGTERM,
                    poll=0.5)
    out = log.read_text()
    assert (run / "metrics.jsonl").is_file(), "training did not start:\n" + out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by signal" in out
    last = int((run / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= last < 100000 and max(losses(run)) == last
    ev = cli("eval", str(spec), "--load", str(run), "--batches", "1", "--json")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout.strip().splitlines()[-1])["loss"] > 0


KILL_DURING_SAVE = """
import os, signal, sys
from dsv4cli.ckpt import atomic
real = atomic.publish
def killed(tmp, run_dir, iteration):
    if iteration == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # all tensors written, not yet renamed
    return real(tmp, run_dir, iteration)
atomic.publish = killed
from dsv4cli.train.entry import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_save_killed_midway_never_becomes_latest(tmp_path):
    spec = write_small_spec(tmp_path)
    run = tmp_path / "run"
    args = [str(spec), "--set", "train.eval_interval=0", "--set", "checkpoint.interval=2", "--set", f"checkpoint.dir={run}"]
    p = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args], cwd=str(REPO), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-2000:]
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (run / "iter_0000004").exists()
    assert list(run.glob(".tmp_iter_0000004.*")), "the killed save left only its temp dir"
    r = cli("train", str(spec), *args[1:])
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not list(run.glob(".tmp_iter_*")), "the next save removes stale temp dirs"
