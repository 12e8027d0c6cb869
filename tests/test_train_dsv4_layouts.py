"""`specs/tiny-dsv4.toml` under torchrun with 2 CPU processes: pipeline, expert, data and tensor parallelism.

Every layout is reached with `--set` alone (the overrides below are exactly what `dsv4 train --set`
takes; `dsv4 validate` accepts each). From a common model-only initial checkpoint (fresh weights
depend on the layout), 3 steps of 2 micro-batches of 4 sequences under
- PP = 2 with `pp_layout`: the hash-routed layer 0 on stage 0 and MTP with the loss on stage 1; or
  every decoder layer, the hash-routed one included, on the last stage (it reads batches too),
- PP = 2 split evenly (a 4-layer variant, no `pp_layout`),
- EP = 2 (4 experts, 2 per rank; routers, hash table and expert bias replicated),
- DP = 2 (micro batch 4),
- TP = 2 with sequence parallelism (megatron needs it for MoE) and expert TP = 2 (with EP = 1
  megatron reduces expert grads as dense ones: etp = tp): heads, output groups and indexer heads
  split, the KV head and compressors replicated, hash ids sliced with the sequence
give the 1-process losses, MTP losses and grad norms (<= 1e-5); the EP = 2 checkpoint, the TP = 2 one
and the PP = 2 one with the hash table on the last rank evaluate in one process to the 1-process run's
held-out loss. An EP = 2 run stopped by `exit_interval` and resumed equals the straight EP = 2 run bit
for bit; a TP = 2 run stopped after step 2 resumes in one process to the 1-process step 3 (<= 1e-5).
"""

from __future__ import annotations

import json

import pytest

from test_train_e2e import REPO, cli, metrics, save_model_only_checkpoint

SPEC = REPO / "specs" / "tiny-dsv4.toml"
TOL = 1e-5
COMMON = ["train.steps=3", "train.eval_interval=0", "train.log_interval=1", "train.warmup_steps=1",
          "train.micro_batch_size=4", "train.global_batch_size=8"]
# 4 decoder layers (+ MTP) split evenly over 2 stages without a pp_layout
EVEN = ["model.num_layers=4", 'model.attention.layer_types=["sliding", "csa", "hca", "sliding", "sliding"]',
        "model.attention.compress_ratios=[0, 4, 16, 0, 0]"]
LAYOUTS = {
    "pp2_layout": ["parallel.pp=2", 'parallel.pp_layout="Et|ttmL"'],
    "pp2_hash_on_last": ["parallel.pp=2", 'parallel.pp_layout="E|tttmL"'],
    "pp2_even": [*EVEN, "parallel.pp=2"],
    "ep2": ["parallel.ep=2"],
    "dp2": ["launch.nproc_per_node=2"],
    "tp2": ["parallel.tp=2"],  # sequence parallelism and etp = 2 follow (MoE under tp needs both)
}


def _sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _eval(load, model: list[str]) -> dict:
    r = cli("eval", str(SPEC), "--load", str(load), "--batches", "1", "--json", *_sets(model))
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ranks_train(overrides: list[str]) -> None:
    from distributed import run_distributed

    results = run_distributed("test_train_distributed:worker", {"spec": str(SPEC), "overrides": overrides})
    assert [r["code"] for r in results] == [0, 0]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """model variant ("tiny" or "even") -> its overrides, initial checkpoint and 1-process run dir (lazily)."""
    tmp, made = tmp_path_factory.mktemp("dsv4_layouts"), {}

    def get(variant: str) -> dict:
        if variant not in made:
            model = EVEN if variant == "even" else []
            init, run = tmp / f"{variant}_init", tmp / f"{variant}_ref"
            _save_init(model, init)
            r = cli("train", str(SPEC), *_sets([*model, *COMMON, f"checkpoint.load={init}", f"checkpoint.dir={run}"]))
            assert r.exit_code == 0, r.output
            made[variant] = {"model": model, "init": init, "run": run, "tmp": tmp}
        return made[variant]

    return get


def _save_init(model: list[str], init) -> None:
    """A model-only checkpoint of fresh weights of tiny-dsv4 with the `model` overrides."""
    if not model:
        save_model_only_checkpoint(SPEC, init)
        return
    from dsv4cli.spec.load import load_spec, spec_to_toml

    path = init.parent / (init.name + ".toml")
    path.write_text(spec_to_toml(load_spec(str(SPEC), model)))
    save_model_only_checkpoint(path, init)


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_layout_validates_with_set_alone(name):
    r = cli("validate", str(SPEC), *_sets([*LAYOUTS[name], *COMMON, "launch.nproc_per_node=2"]))
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("overrides, says", [
    (["parallel.pp=2"], "model.num_layers (3) is not divisible by parallel.pp*parallel.vpp (2*1 = 2)"),
    (["parallel.ep=2", "train.micro_batch_size=8"], "not divisible by micro_batch_size*dp = 8*2 = 16"),
    (["parallel.ep=2", "parallel.pp=2", 'parallel.pp_layout="Et|ttmL"'], "expert grid etp*ep*pp = 1*2*2 = 4"),
    (["parallel.tp=2", "parallel.etp=1"],
     "MoE with parallel.ep = 1 needs parallel.etp = parallel.tp (tp = 2, etp = 1)"),
    (["parallel.tp=2", "parallel.sequence_parallel=false"], "needs parallel.sequence_parallel = true"),
    (["parallel.tp=2", "model.attention.index_n_heads=3"],
     "parallel.tp (2) does not divide model.attention.index_n_heads (3)"),
])
def test_a_layout_that_cannot_work_exits_2_saying_why(overrides, says):
    r = cli("validate", str(SPEC), *_sets([*overrides, "launch.nproc_per_node=2"]))
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output


@pytest.fixture(scope="module")
def runs(references):
    """layout name -> (its 1-process reference, its 2-process run dir), run once from the common start."""
    made = {}

    def get(name: str):
        if name not in made:
            ref = references("even" if name == "pp2_even" else "tiny")
            run = ref["tmp"] / name
            overrides = LAYOUTS[name] if name == "pp2_even" else [*ref["model"], *LAYOUTS[name]]
            _ranks_train([*overrides, *COMMON, f"checkpoint.load={ref['init']}", f"checkpoint.dir={run}"])
            made[name] = (ref, run)
        return made[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_two_process_layout_matches_one_process(runs, name):
    ref, run = runs(name)
    a, b = metrics(ref["run"]), metrics(run)
    assert [x["step"] for x in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= TOL, (x["step"], x["loss"], y["loss"])
        assert len(y["mtp_losses"]) == 1 and abs(x["mtp_losses"][0] - y["mtp_losses"][0]) <= TOL
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4 * max(1.0, x["grad_norm"]), x["step"]
        if name == "tp2":  # the indexer's top-k and loss as one process (its scores summed in head order)
            assert abs(x["indexer_loss"] - y["indexer_loss"]) <= 1e-6 and x["indexer_loss"] > 0, x["step"]
    meta = json.loads((run / "iter_0000003" / "dsv4_meta.json").read_text())["parallel"]
    assert meta["world"] == 2 and (meta["tp"], meta["pp"], meta["ep"], meta["dp"]) == {
        "ep2": (1, 1, 2, 2), "dp2": (1, 1, 1, 2), "tp2": (2, 1, 1, 1)}.get(name, (1, 2, 1, 1))
    if name in ("ep2", "pp2_hash_on_last", "tp2"):  # one process reads the expert shards / the last rank's hash table
        if "eval" not in ref:
            ref["eval"] = _eval(ref["run"], ref["model"])
        ev = _eval(run, ref["model"])
        assert abs(ev["loss"] - ref["eval"]["loss"]) <= TOL and ev["tokens"] == ref["eval"]["tokens"]


@pytest.mark.slow
def test_ep2_stopped_by_exit_interval_and_resumed_equals_a_straight_run(runs):
    ref, straight = runs("ep2")
    split = ref["tmp"] / "ep2_split"
    stop = ["parallel.ep=2", *COMMON, "train.exit_interval=2", f"checkpoint.dir={split}"]
    _ranks_train([*stop, f"checkpoint.load={ref['init']}"])
    assert (split / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert [x["step"] for x in metrics(split)] == [1, 2]
    _ranks_train(stop)  # no checkpoint.load: resumes from the run directory's step 2
    a, b = metrics(straight), metrics(split)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3]
    for x, y in zip(a, b):  # step 3 follows an update that used the restored Adam moments
        for key in ("loss", "mtp_losses", "grad_norm", "lr"):
            assert x[key] == y[key], (x["step"], key, x[key], y[key])


@pytest.mark.slow
def test_tp2_checkpoint_resumes_in_one_process(references):
    """TP-split tensors are saved with their global shape: a TP = 2 step-2 checkpoint (model and
    optimizer) continues in one process to the 1-process run's step 3."""
    ref = references("tiny")
    saved, cont = ref["tmp"] / "tp2_split", ref["tmp"] / "tp2_to_1"
    _ranks_train([*LAYOUTS["tp2"], *COMMON, "train.exit_interval=2", f"checkpoint.load={ref['init']}",
                  f"checkpoint.dir={saved}"])
    r = cli("train", str(SPEC), *_sets([*COMMON, f"checkpoint.load={saved / 'iter_0000002'}",
                                        f"checkpoint.dir={cont}"]))
    assert r.exit_code == 0, r.output
    assert "fresh optimizer" not in r.output
    a, b = metrics(ref["run"])[-1], metrics(cont)[-1]
    assert a["step"] == b["step"] == 3
    assert abs(a["loss"] - b["loss"]) <= TOL and abs(a["mtp_losses"][0] - b["mtp_losses"][0]) <= TOL, (a, b)
