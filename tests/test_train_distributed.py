"""`dsv4 train` / `dsv4 eval` under torchrun with 2 CPU processes match one process.

All runs start from the same model-only checkpoint (fresh weights depend on the pipeline
layout, so a common start makes layouts comparable; it also exercises resharded resume):
- DP=2 (through the real `dsv4 train --nproc-per-node 2` torchrun launch), TP=2 and PP=2
  (through the shared tests/distributed.py harness calling the per-rank entry point) give the
  1-process losses of the first steps (<= 1e-5).
- The 1-process (TP=1) checkpoint evaluates to the same held-out loss under TP=2 and PP=2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_train_e2e import REPO, _env, cli, metrics, save_model_only_checkpoint, write_small_spec

STEPS = 3
TOL = 1e-5


def worker(args: dict) -> dict:
    """Per-rank body for tests/distributed.py: run the real entry point (train or eval)."""
    from dsv4cli.train.entry import run

    out: dict = {}
    code = run(args["spec"], args["overrides"], mode=args.get("mode", "train"), load=args.get("load"),
               batches=args.get("batches"), out=out)
    return {"code": code, **out}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process run from a common initial checkpoint: spec, init dir, run dir, eval result."""
    tmp = tmp_path_factory.mktemp("train_dist")
    spec = write_small_spec(tmp)
    init = tmp / "init"
    save_model_only_checkpoint(spec, init)
    run = tmp / "ref"
    r = cli("train", str(spec), "--set", f"train.steps={STEPS}", "--set", "train.eval_interval=0",
            "--set", f"checkpoint.load={init}", "--set", f"checkpoint.dir={run}")
    assert r.exit_code == 0, r.output
    ev = cli("eval", str(spec), "--load", str(run), "--batches", "2", "--json")
    assert ev.exit_code == 0, ev.output
    return {"spec": spec, "init": init, "run": run, "tmp": tmp, "eval": json.loads(ev.stdout.strip().splitlines()[-1])}


def _assert_same_losses(ref_run, other_run):
    a, b = metrics(ref_run), metrics(other_run)
    assert [x["step"] for x in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= TOL, (x["step"], x["loss"], y["loss"])
        for u, v in zip(x["mtp_losses"], y["mtp_losses"]):
            assert abs(u - v) <= TOL, (x["step"], u, v)
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4 * max(1.0, x["grad_norm"]), x["step"]


@pytest.mark.slow
def test_dp2_torchrun_launch_matches_one_process(reference):
    run = reference["tmp"] / "dp2"
    from distributed import free_port

    p = subprocess.run(
        [sys.executable, "-m", "dsv4cli.cli", "train", str(reference["spec"]), "--nproc-per-node", "2",
         "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--set", f"train.steps={STEPS}",
         "--set", "train.eval_interval=0", "--set", f"checkpoint.load={reference['init']}",
         "--set", f"checkpoint.dir={run}"],
        cwd=str(REPO), env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "dp 2" in p.stdout
    _assert_same_losses(reference["run"], run)
    meta = json.loads((run / f"iter_{STEPS:07d}" / "dsv4_meta.json").read_text())
    assert meta["parallel"]["dp"] == 2 and meta["parallel"]["world"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_tp2_and_pp2_training_match_one_process(reference, layout):
    from distributed import run_distributed

    run = reference["tmp"] / layout.replace("=", "")
    overrides = [layout, f"train.steps={STEPS}", "train.eval_interval=0", f"checkpoint.load={reference['init']}",
                 f"checkpoint.dir={run}"]
    results = run_distributed("test_train_distributed:worker", {"spec": str(reference["spec"]), "overrides": overrides})
    assert [r["code"] for r in results] == [0, 0]
    _assert_same_losses(reference["run"], run)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_tp1_checkpoint_evaluates_the_same_under_tp2_and_pp2(reference, layout):
    from distributed import run_distributed

    results = run_distributed("test_train_distributed:worker", {
        "spec": str(reference["spec"]), "overrides": [layout], "mode": "eval", "load": str(reference["run"]),
        "batches": 2})
    ref = reference["eval"]
    for r in results:
        assert r["code"] == 0
        assert abs(r["loss"] - ref["loss"]) <= TOL, (layout, r["loss"], ref["loss"])
        assert len(r["mtp_losses"]) == 1 and abs(r["mtp_losses"][0] - ref["mtp_losses"][0]) <= TOL
        assert r["tokens"] == ref["tokens"]


@pytest.mark.slow
def test_resume_with_optimizer_state_under_tp2_matches_one_process(reference):
    """A 1-process checkpoint (model + optimizer + scheduler) continues identically under TP=2."""
    import shutil

    from distributed import run_distributed

    one, two = reference["tmp"] / "cont1", reference["tmp"] / "cont_tp2"
    shutil.copytree(reference["run"], one)
    shutil.copytree(reference["run"], two)
    more = [f"train.steps={STEPS + 2}", "train.eval_interval=0"]
    r = cli("train", str(reference["spec"]), *[a for o in more + [f"checkpoint.dir={one}"] for a in ("--set", o)])
    assert r.exit_code == 0, r.output
    assert "fresh optimizer" not in r.stdout
    results = run_distributed("test_train_distributed:worker", {
        "spec": str(reference["spec"]), "overrides": ["parallel.tp=2", *more, f"checkpoint.dir={two}"]})
    assert [x["code"] for x in results] == [0, 0]
    a = {x["step"]: x for x in metrics(one)}
    b = {x["step"]: x for x in metrics(two)}
    for step in (STEPS + 1, STEPS + 2):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= TOL, (step, a[step]["loss"], b[step]["loss"])
        assert a[step]["lr"] == b[step]["lr"]


@pytest.mark.slow
def test_sigterm_to_dsv4_under_torchrun_saves_and_exits_0(tmp_path):
    import signal
    import time

    from distributed import free_port

    spec = write_small_spec(tmp_path)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv4cli.cli", "train", str(spec), "--nproc-per-node", "2",
         "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--set", "train.steps=100000",
         "--set", "train.eval_interval=0", "--set", f"checkpoint.dir={run}"],
        cwd=str(REPO), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 2):
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "stopped by signal" in out and "SignalException" not in out
    last = int((run / "latest_checkpointed_iteration.txt").read_text())
    assert last >= 2 and (run / f"iter_{last:07d}" / "dsv4_meta.json").is_file()
    assert json.loads((run / f"iter_{last:07d}" / "dsv4_meta.json").read_text())["parallel"]["dp"] == 2
