"""The distributed optimizer (`train.distributed_optimizer = "on"`) on CPU (gloo, torch Adam).

In-process (1 process): a reload continues bit for bit, also with the distributed optimizer
switched on -> off and off -> on between save and load.

Slow, one legacy (`contraction.mode = "average"`) spec, DP = 2 under torchrun:
- stopped by `exit_interval` and resumed equals a straight run bit for bit;
- its checkpoint (megatron's `fully_reshardable` per-parameter format) resumes under 1 process
  (the model evaluates to the logged held-out loss, the next steps equal the DP = 2 run);
- `dsv4 convert-ckpt` keeps its Adam moments and main params, adds zero moments for the new
  `hc_head_*`, and the converted checkpoint resumes.
"""

from __future__ import annotations

import json
import shutil

import pytest

from test_train_e2e import cli, metrics, write_small_spec

STEPS, EXIT = 4, 2
TOL = 1e-5
LEGACY = '\n[model.contraction]\nmode = "average"\n'
COMMON = [f"train.steps={STEPS}", "train.eval_interval=2", "train.eval_batches=1", "train.distributed_optimizer=on"]
STATES = ("param", "exp_avg", "exp_avg_sq")


def _dp2(spec, run, *extra: str) -> None:
    from distributed import run_distributed

    results = run_distributed("test_train_distributed:worker", {
        "spec": str(spec), "overrides": [*COMMON, f"checkpoint.dir={run}", *extra]})
    assert [r["code"] for r in results] == [0, 0]


def _train_one_process(spec, *overrides: str):
    return cli("train", str(spec), *[a for o in (*COMMON, *overrides) for a in ("--set", o)])


def _one_step(rt, seed: int) -> None:
    import numpy as np

    from dsv4cli.train.runtime import run_microbatches

    s, b = rt.spec.model.seq_length, rt.spec.train.micro_batch_size
    tokens = np.random.default_rng(seed).integers(0, 256, (b, s + 1))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": np.ones((b, s), np.float32),
             "position_ids": np.tile(np.arange(s), (b, 1))}
    for m in rt.model:
        m.zero_grad_buffer()
    rt.optimizer.zero_grad()
    run_microbatches(rt, [batch], forward_only=False)
    assert rt.optimizer.step()[0]


def _adam_states(rt) -> list[dict]:
    inner = rt.optimizer.chained_optimizers[0].optimizer
    return [inner.state[p] for g in inner.param_groups for p in g["params"]]


@pytest.mark.parametrize("saved_with,loaded_with", [("on", "on"), ("on", "off"), ("off", "on")])
def test_one_process_reload_continues_exactly(tmp_path, tiny_spec, cpu_compat, saved_with, loaded_with):
    """In-process: save after 2 steps, reload into a fresh runtime (distributed optimizer on/off, also
    switched), the 3rd step gives the weights of the run that never stopped."""
    import torch

    from dsv4cli.spec.load import spec_to_toml
    from dsv4cli.ckpt.adam_state import is_distributed
    from dsv4cli.ckpt.load import load_checkpoint
    from dsv4cli.ckpt.save import TrainProgress, save_checkpoint
    from dsv4cli.build.parallel import destroy_parallel
    from dsv4cli.train.runtime import build_runtime

    def spec(mode):
        return tiny_spec(**{"train.distributed_optimizer": mode, "checkpoint.dir": str(tmp_path)})

    rt = build_runtime(spec(saved_with))
    try:
        assert is_distributed(rt.optimizer) == (saved_with == "on")
        _one_step(rt, 0)
        _one_step(rt, 1)
        path = save_checkpoint(tmp_path, rt.chunks, rt.optimizer, rt.scheduler, TrainProgress(iteration=2),
                               spec_to_toml(spec(saved_with)), rt.dims.checkpoint_layout())
        _one_step(rt, 2)
        expected = [p.detach().clone() for p in rt.chunks[0].parameters()]
    finally:
        destroy_parallel()
    rt = build_runtime(spec(loaded_with))
    try:
        _, notes = load_checkpoint(path, rt.chunks, rt.optimizer, rt.scheduler, rt.dims.checkpoint_layout())
        assert (saved_with != loaded_with) == any("taken over" in n for n in notes), notes
        steps = [st["step"] for st in _adam_states(rt)]
        assert len({id(t) for t in steps}) == len(steps) > 1, "every parameter has its own Adam step"
        assert all(float(t) == 2.0 for t in steps)
        _one_step(rt, 2)
        for a, b in zip(expected, rt.chunks[0].parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DP = 2 runs: straight (4 steps), split (2 + resumed 2) and a copy of split's step-2 checkpoint."""
    tmp = tmp_path_factory.mktemp("distopt")
    spec = write_small_spec(tmp, LEGACY)
    straight, split, saved = tmp / "straight", tmp / "split", tmp / "saved"
    _dp2(spec, straight)
    _dp2(spec, split, f"train.exit_interval={EXIT}")
    shutil.copytree(split, saved)
    _dp2(spec, split)
    return {"spec": spec, "tmp": tmp, "straight": straight, "split": split, "saved": saved / f"iter_{EXIT:07d}"}


@pytest.mark.slow
def test_dp2_resume_is_bit_exact_and_state_is_stored_per_parameter(runs):
    from dsv4cli.ckpt.metadata import stored_tensors

    a, b = metrics(runs["straight"]), metrics(runs["split"])
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for key in ("loss", "mtp_losses", "grad_norm", "lr", "eval_loss"):
            assert x.get(key) == y.get(key), (x["step"], key, x.get(key), y.get(key))

    shapes = stored_tensors(runs["saved"])
    model = {k: s for k, s in shapes.items() if not k.startswith("optimizer.")}
    assert model and len(shapes) == len(model) * (1 + len(STATES))
    for k, s in model.items():
        for state in STATES:
            assert shapes[f"optimizer.state.{state}.{k}"] == s, (state, k)


@pytest.mark.slow
def test_dp2_checkpoint_resumes_under_one_process(runs):
    straight = {x["step"]: x for x in metrics(runs["straight"])}
    ev = cli("eval", str(runs["spec"]), "--load", str(runs["saved"]), "--batches", "1", "--json")
    assert ev.exit_code == 0, ev.output
    loss = json.loads(ev.stdout.strip().splitlines()[-1])["loss"]
    assert abs(loss - straight[EXIT]["eval_loss"]) <= TOL, (loss, straight[EXIT]["eval_loss"])

    one = runs["tmp"] / "one"
    r = _train_one_process(runs["spec"], f"checkpoint.load={runs['saved']}", f"checkpoint.dir={one}")
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.stdout and "fresh optimizer" not in r.stdout
    got = {x["step"]: x for x in metrics(one)}
    assert sorted(got) == list(range(EXIT + 1, STEPS + 1))
    for step, x in got.items():
        ref = straight[step]
        assert abs(x["loss"] - ref["loss"]) <= TOL, (step, x["loss"], ref["loss"])
        assert abs(x["mtp_losses"][0] - ref["mtp_losses"][0]) <= TOL, step
        assert abs(x["grad_norm"] - ref["grad_norm"]) <= TOL * max(1.0, ref["grad_norm"]), step
        assert x["lr"] == ref["lr"]


@pytest.mark.slow
def test_convert_ckpt_keeps_the_adam_state_and_the_result_resumes(runs):
    import torch

    from dsv4cli.ckpt.tensors import load_all_tensors

    conv = runs["tmp"] / "converted"
    r = cli("convert-ckpt", str(runs["saved"]), str(conv), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["optimizer"] == "per-parameter"
    src, dst = load_all_tensors(runs["saved"]), load_all_tensors(conv / f"iter_{EXIT:07d}")
    assert any(k.startswith("optimizer.state.exp_avg.") for k in src)
    for k, v in src.items():
        assert torch.equal(dst[k], v), k
    added = sorted(set(dst) - set(src))
    heads = [k for k in added if not k.startswith("optimizer.")]
    assert heads == sorted(f"{b}{n}" for b in ("decoder.", "mtp.layers.0.")
                           for n in ("hc_head_base", "hc_head_fn", "hc_head_scale"))
    assert len(added) == len(heads) * (1 + len(STATES))
    for k in heads:
        assert torch.equal(dst[f"optimizer.state.param.{k}"], dst[k]), k
        assert not dst[f"optimizer.state.exp_avg.{k}"].any() and not dst[f"optimizer.state.exp_avg_sq.{k}"].any()

    resumed = runs["tmp"] / "resumed"
    r = _train_one_process(runs["spec"], 'model.contraction.mode="learned"', f"checkpoint.load={conv}",
                           f"checkpoint.dir={resumed}", f"train.steps={EXIT + 1}")
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.stdout and "fresh optimizer" not in r.stdout
    first = metrics(resumed)[0]
    ref = {x["step"]: x for x in metrics(runs["straight"])}[EXIT + 1]
    assert first["step"] == EXIT + 1 and abs(first["loss"] - ref["loss"]) <= TOL, (first, ref["loss"])
    after = load_all_tensors(resumed / f"iter_{EXIT + 1:07d}")
    assert after["optimizer.state.exp_avg.decoder.hc_head_fn"].abs().max() > 0
