"""Resuming with optimizer state: MoE with expert parallelism, and checkpoints that change layout.

MoE + mHC + MTP (small spec, 4 experts, top-2), EP = 2 under a real `dsv4 train --nproc-per-node 2`:
- stopped by exit_interval and resumed equals a straight run (`dsv4 eval --json` loss identical);
  `dsv4 eval`, `dsv4 inspect checkpoint` and `dsv4 inspect diff` read its chained optimizer state;
- resumed under EP = 1 (DP = 2), its next steps equal the straight EP = 2 run (<= 1e-5);
- an EP = 2 legacy (contraction.mode = "average") checkpoint converts with its optimizer state kept
  (zero moments under the right `chained_{i}.` prefix), evaluates as before, and resumes.
Dense layout changes (1 process -> TP = 2 is in test_train_distributed.py): TP = 2, PP = 2 and
DP = 2 checkpoints resume in 1 process; the model evaluates as the 1-process one saved at the same
step and the next steps equal a run that never changed layout (<= 1e-5; equal losses under a DP
change also mean the same samples). A checkpoint whose optimizer state does not fit the resuming
optimizer exits 2 naming `checkpoint.load_optimizer = false`, which then resumes from the saved
model. Every run is a few steps of a tiny model; saved checkpoints are shared between cases.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_e2e import REPO, _env, cli, losses, save_model_only_checkpoint, write_small_spec

TOL = 1e-5
MOE = """
[model.moe]
num_experts = 4
top_k = 2
expert_ffn_hidden_size = 32
"""
COMMON = ["train.steps=4", "train.eval_interval=0", "checkpoint.interval=2"]


def _sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _torchrun_train(spec: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """The real `dsv4 train --nproc-per-node 2` launch."""
    from distributed import free_port

    return subprocess.run(
        [sys.executable, "-m", "dsv4cli.cli", "train", str(spec), "--nproc-per-node", "2",
         "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *_sets(overrides)],
        cwd=str(REPO), env=_env(), capture_output=True, text=True, timeout=600)


def _ranks_train(spec: Path, overrides: list[str]) -> None:
    """2 ranks through tests/distributed.py calling the per-rank entry point."""
    from distributed import run_distributed

    results = run_distributed("test_train_distributed:worker", {"spec": str(spec), "overrides": overrides})
    assert [r["code"] for r in results] == [0, 0]


def _eval(spec: Path, load: Path, *overrides: str) -> dict:
    r = cli("eval", str(spec), "--load", str(load), "--batches", "1", "--json", *_sets(overrides))
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def _assert_close(a: dict, b: dict, steps) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= TOL, (s, a[s], b[s])


# --------------------------------------------------------------------------- MoE, EP = 2


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """EP = 2 runs of the MoE spec: straight (A), stopped at step 2 and resumed (B)."""
    tmp = tmp_path_factory.mktemp("moe")
    spec = write_small_spec(tmp, MOE)
    a, b = tmp / "a", tmp / "b"
    p = _torchrun_train(spec, ["parallel.ep=2", *COMMON, f"checkpoint.dir={a}"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    stop = ["parallel.ep=2", *COMMON, "train.exit_interval=2", f"checkpoint.dir={b}"]
    first = _torchrun_train(spec, stop)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (b / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    second = _torchrun_train(spec, stop)
    return {"spec": spec, "tmp": tmp, "a": a, "b": b, "first": first, "second": second}


@pytest.mark.slow
def test_moe_ep2_stopped_and_resumed_equals_a_straight_run(moe):
    second = moe["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "fresh optimizer" not in second.stdout
    assert (moe["b"] / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    ea, eb = _eval(moe["spec"], moe["a"]), _eval(moe["spec"], moe["b"])  # EP = 1, one process
    assert ea["loss"] == eb["loss"] and ea["mtp_losses"] == eb["mtp_losses"]
    assert losses(moe["a"])[4] == losses(moe["b"])[4]


@pytest.mark.slow
def test_moe_ep2_checkpoint_inspects_with_chained_optimizer_state(moe):
    r = cli("inspect", "checkpoint", str(moe["b"]), "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["conformant"], rep["problems"]
    groups = {g["group"] for g in rep["tree"]}
    assert {"chained_0.optimizer.state.exp_avg", "chained_1.optimizer.state.exp_avg_sq"} <= groups
    assert rep["optimizer_bytes"] > rep["model_bytes"] > 0  # exp_avg + exp_avg_sq of every parameter
    d = cli("inspect", "diff", str(moe["a"]), str(moe["b"]), "--json")
    assert d.exit_code == 0, d.output
    diff = json.loads(d.stdout)
    assert not diff["only_in_a"] and not diff["only_in_b"] and diff["different"] == 0
    assert any(c["name"].startswith("chained_1.optimizer.") for c in diff["compared"])


@pytest.mark.slow
def test_moe_ep2_checkpoint_resumes_under_ep1_dp2(moe):
    """EP = 2 -> EP = 1 (DP = 2): model and Adam moments reshard; the next steps equal the EP = 2 run."""
    run = moe["tmp"] / "ep1"
    _ranks_train(moe["spec"], [*COMMON, f"checkpoint.load={moe['b'] / 'iter_0000002'}", f"checkpoint.dir={run}"])
    # step 3's loss is the loaded model's (before the update); step 4 needs the Adam moments too
    _assert_close(losses(moe["a"]), losses(run), (3, 4))
    meta = json.loads((run / "iter_0000004" / "dsv4_meta.json").read_text())
    assert meta["parallel"]["ep"] == 1 and meta["parallel"]["dp"] == 2


@pytest.mark.slow
def test_moe_ep2_legacy_checkpoint_converts_with_optimizer_state_and_resumes(moe):
    tmp, spec = moe["tmp"], moe["spec"]
    legacy, conv, cont = tmp / "legacy", tmp / "converted", tmp / "cont"
    avg = "model.contraction.mode=average"
    p = _torchrun_train(spec, ["parallel.ep=2", avg, "train.steps=2", "train.eval_interval=0",
                               f"checkpoint.dir={legacy}"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = cli("convert-ckpt", str(legacy), str(conv), "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["optimizer"] == "per-parameter" and res["optimizer_states"] == ["exp_avg", "exp_avg_sq"]
    rep = json.loads(cli("inspect", "checkpoint", str(conv), "--json").stdout)
    names = {t["name"] for t in rep["tensors"]}
    for block in ("decoder.", "mtp.layers.0."):
        for state in ("exp_avg", "exp_avg_sq"):
            assert f"chained_0.optimizer.state.{state}.{block}hc_head_fn" in names
    assert not any(n.startswith("optimizer.") for n in names)  # nothing under a prefix the resume won't ask for
    assert rep["conformant"] and not rep["legacy"], rep["problems"]
    # function-preserving: the converted (learned) model evaluates as the legacy (average) one
    assert abs(_eval(spec, legacy, avg)["loss"] - _eval(spec, conv)["loss"]) <= TOL
    # resumed in one process (EP = 1: one optimizer instead of the saved dense + expert chain)
    r = cli("train", str(spec), *_sets(["train.steps=3", "train.eval_interval=0", f"checkpoint.load={conv}",
                                        f"checkpoint.dir={cont}"]))
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and "fresh optimizer" not in r.output
    assert 3 in losses(cont)


# --------------------------------------------------------------------------- dense layout changes


def test_a_global_batch_holds_the_same_samples_for_any_data_parallel_size():
    """The saved data position is global (samples consumed), so a DP change repeats and skips nothing."""
    import numpy as np

    from dsv4cli.train.data import microbatches

    class Source:
        def __len__(self):
            return 100

        def __getitem__(self, i):
            return np.full(3, i), np.full(3, i), np.ones(3, np.float32)

    for position in (0, 8, 16):
        seen = {dp: sorted(int(row[0]) for r in range(dp) for mb in microbatches(Source(), position, 8, 2, r, dp)
                           for row in mb["tokens"]) for dp in (1, 2, 4)}
        assert seen[1] == seen[2] == seen[4] == list(range(position, position + 8))



@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A common initial checkpoint and the 1-process run from it (checkpoints at steps 2 and 4)."""
    tmp = tmp_path_factory.mktemp("layouts")
    spec = write_small_spec(tmp)
    init = tmp / "init"
    save_model_only_checkpoint(spec, init)
    ref = tmp / "ref"
    r = cli("train", str(spec), *_sets([*COMMON, f"checkpoint.load={init}", f"checkpoint.dir={ref}"]))
    assert r.exit_code == 0, r.output
    return {"spec": spec, "tmp": tmp, "init": init, "ref": ref, "ref_eval": _eval(spec, ref / "iter_0000002")}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2", "dp=2"])
def test_checkpoint_of_another_layout_resumes_in_one_process(dense, layout):
    tmp, spec = dense["tmp"], dense["spec"]
    saved, cont = tmp / layout.replace("=", ""), tmp / (layout.replace("=", "") + "_to_1")
    extra = [] if layout == "dp=2" else [layout]  # two processes: DP = 2 unless TP or PP takes them
    _ranks_train(spec, [*extra, "train.steps=2", "train.eval_interval=0", f"checkpoint.load={dense['init']}",
                        f"checkpoint.dir={saved}"])
    assert json.loads((saved / "iter_0000002" / "dsv4_meta.json").read_text())["parallel"]["world"] == 2
    ev = _eval(spec, saved / "iter_0000002")
    assert abs(ev["loss"] - dense["ref_eval"]["loss"]) <= TOL
    r = cli("train", str(spec), *_sets([*COMMON, f"checkpoint.load={saved / 'iter_0000002'}",
                                        f"checkpoint.dir={cont}"]))
    assert r.exit_code == 0, r.output
    assert "fresh optimizer" not in r.output
    _assert_close(losses(dense["ref"]), losses(cont), (3, 4))


def _drop_tensor(iter_dir: Path, name: str) -> None:
    """Remove one tensor's entries from a copied checkpoint's .metadata (its bytes stay unreferenced)."""
    path = iter_dir / ".metadata"
    md = pickle.loads(path.read_bytes())
    del md.state_dict_metadata[name]
    md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != name}
    if isinstance(md.planner_data, dict):
        md.planner_data.pop(name, None)
    path.write_bytes(pickle.dumps(md))


@pytest.mark.slow
def test_optimizer_state_that_does_not_fit_exits_2_and_fresh_optimizer_resume_starts_from_the_model(dense):
    tmp, spec = dense["tmp"], dense["spec"]
    foreign = tmp / "foreign" / "iter_0000002"
    shutil.copytree(dense["ref"] / "iter_0000002", foreign)
    _drop_tensor(foreign, "optimizer.state.exp_avg.output_layer.weight")
    run = tmp / "fresh"
    base = ["train.steps=3", "train.eval_interval=0", f"checkpoint.load={foreign}", f"checkpoint.dir={run}"]
    r = cli("train", str(spec), *_sets(base))
    assert r.exit_code == 2, r.output
    assert "optimizer.state.exp_avg.output_layer.weight" in r.output
    assert "checkpoint.load_optimizer=false" in r.output and "Traceback" not in r.output
    assert not (run / "metrics.jsonl").exists()
    r = cli("train", str(spec), *_sets([*base, "checkpoint.load_optimizer=false"]))
    assert r.exit_code == 0, r.output
    assert "fresh optimizer" in r.output
    _assert_close(losses(dense["ref"]), losses(run), (3,))  # the saved weights at the saved data position
