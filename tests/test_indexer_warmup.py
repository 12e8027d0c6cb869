"""The indexer's dense warm-up trains the indexer alone (in-process, tiny-dsv4, a few steps): during
iterations < indexer_warmup_steps every other parameter, its Adam moments and the routers' expert
biases stay bit-identical while the indexer learns; afterwards the whole model trains. Without a
warm-up (or without an indexer loss) a training step computes what it computed before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_train_e2e import REPO

SPEC = str(REPO / "specs" / "tiny-dsv4.toml")
FAST = ["train.micro_batch_size=2", "train.global_batch_size=2", "train.warmup_steps=1", "train.steps=3"]


def _batch(spec, seed: int) -> dict:
    s, b = spec.model.seq_length, spec.train.micro_batch_size
    tokens = np.random.default_rng(seed).integers(0, 256, (b, s + 1))
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": np.ones((b, s), np.float32),
            "position_ids": np.tile(np.arange(s), (b, 1))}


def _spec(*overrides: str):
    from dsv4cli.spec.load import load_spec

    return load_spec(SPEC, [*FAST, *overrides])


def _runtime(spec):
    from dsv4cli.train.runtime import build_runtime
    from dsv4cli.train.step import ModelParts

    rt = build_runtime(spec)
    return rt, ModelParts.collect(rt)


def _inner_optimizers(optimizer) -> list:
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def _moments(optimizer, indexer: bool) -> list[torch.Tensor]:
    """Adam's moments of every parameter (shard) in the indexer's groups (`indexer`) or in the others."""
    from dsv4cli.build.optimizer import is_indexer_group

    return [inner.state[p][k] for inner in _inner_optimizers(optimizer) for g in inner.param_groups
            if is_indexer_group(g) == indexer for p in g["params"] for k in ("exp_avg", "exp_avg_sq")]


def _state(rt) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (the routers' expert biases) of the model, copied."""
    return {k: v.detach().clone() for c in rt.chunks for k, v in c.state_dict(keep_vars=True).items()
            if torch.is_tensor(v)}


@pytest.mark.parametrize("distributed_optimizer", ["off", "on"])
def test_the_warmup_changes_the_indexer_alone(cpu_compat, distributed_optimizer):
    from dsv4cli.build.optimizer import is_indexer_group
    from dsv4cli.build.parallel import destroy_parallel
    from dsv4cli.train.step import train_step

    spec = _spec("model.attention.indexer_warmup_steps=2", "model.moe.expert_bias_update_rate=0.01",
                 f"train.distributed_optimizer={distributed_optimizer}")
    rt, parts = _runtime(spec)
    try:
        indexer = {n for c in rt.chunks for n, _ in c.named_parameters() if ".self_attention.indexer." in n}
        frozen = {id(p) for p in parts.frozen}
        assert parts.freeze_steps == 2 and len(indexer) == 6  # q_up, weights, the compressor's four
        assert indexer == {n for c in rt.chunks for n, p in c.named_parameters() if id(p) not in frozen}
        groups = rt.optimizer.param_groups
        assert any(is_indexer_group(g) for g in groups) and not all(is_indexer_group(g) for g in groups)
        before = _state(rt)
        results = [train_step(rt, parts, [_batch(spec, it)], it) for it in range(2)]
        after = _state(rt)
        assert all(r.ok and r.values.indexer_loss > 0 for r in results)
        for name, value in after.items():
            if name in indexer:
                assert not torch.equal(value, before[name]), f"the warm-up did not train {name}"
            else:
                assert torch.equal(value, before[name]), f"the warm-up changed {name}"
        assert any(name.endswith("router.expert_bias") for name in after)
        frozen, trained = _moments(rt.optimizer, indexer=False), _moments(rt.optimizer, indexer=True)
        assert frozen and all(not m.any() for m in frozen), "non-indexer Adam moments stay at their zero start"
        assert trained and all(m.any() for m in trained)
        assert len({float(g["lr"]) for g in groups}) == 1, "one learning-rate schedule for every group"

        third = train_step(rt, parts, [_batch(spec, 2)], 2)  # the warm-up is over: everything trains
        changed = {n for n, v in _state(rt).items() if not torch.equal(v, after[n])}
        assert third.ok and "output_layer.weight" in changed and any(n.endswith("router.expert_bias") for n in changed)
        assert len(changed) > 0.8 * len(after), sorted(set(after) - changed)
        assert all(m.any() for m in _moments(rt.optimizer, indexer=False)[:4])
    finally:
        destroy_parallel()


def _step_as_before(rt, batch: dict, iteration: int) -> float:
    """The training step as the loop ran it before the warm-up froze anything (plain megatron calls)."""
    from dsv4cli.model.dsv4.expert_bias import biased_routers, update_expert_bias
    from dsv4cli.model.dsv4.indexer_loss import attention_modules, set_iteration
    from dsv4cli.train.runtime import reduce_step_values, run_microbatches

    for m in rt.model:
        m.zero_grad_buffer()
    rt.optimizer.zero_grad()
    set_iteration(attention_modules(rt.chunks), iteration)
    losses = run_microbatches(rt, [batch], forward_only=False)
    assert rt.optimizer.step()[0]
    rt.scheduler.step(increment=1)
    update_expert_bias(biased_routers(rt.chunks), rt.config)
    return reduce_step_values(rt, losses, 1).loss


@pytest.mark.parametrize("overrides", [[], ["model.attention.indexer_warmup_steps=1",
                                              "model.attention.indexer_loss_weight=0"]],
                         ids=["no-warmup", "warmup-without-indexer-loss"])
def test_without_an_indexer_warmup_steps_train_as_before(cpu_compat, overrides):
    """No warm-up, or a dense warm-up without an indexer loss (the whole model trains on the LM loss):
    megatron's standard param groups, and the same losses and weights as the plain step."""
    from dsv4cli.build.optimizer import is_indexer_group
    from dsv4cli.build.parallel import destroy_parallel
    from dsv4cli.train.step import train_step

    spec = _spec(*overrides)
    runs = []
    for step in ("train_step", "as before"):
        rt, parts = _runtime(spec)
        try:
            assert parts.freeze_steps == 0 and not any(is_indexer_group(g) for g in rt.optimizer.param_groups)
            if step == "train_step":
                losses = [train_step(rt, parts, [_batch(spec, it)], it).values.loss for it in range(2)]
            else:
                losses = [_step_as_before(rt, _batch(spec, it), it) for it in range(2)]
            runs.append((losses, _state(rt)))
        finally:
            destroy_parallel()
    (losses_a, state_a), (losses_b, state_b) = runs
    assert losses_a == losses_b
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def warmup_worker(args: dict) -> dict:
    """Per-rank body for tests/distributed.py: the real entry point, recording after each step whether
    this rank's non-indexer parameters kept their values."""
    import dsv4cli.train.step as st
    from dsv4cli.train.entry import run

    seen, real = [], st.train_step

    def spy(rt, parts, batches, iteration, stop=False):
        held = [p.detach().clone() for p in parts.frozen]
        result = real(rt, parts, batches, iteration, stop)
        seen.append({"iteration": iteration, "held": len(held), "indexer_loss": result.values.indexer_loss,
                     "unchanged": all(torch.equal(a, p) for a, p in zip(held, parts.frozen))})
        return result

    st.train_step = spy
    return {"code": run(args["spec"], args["overrides"]), "steps": seen}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.ep=2", "train.distributed_optimizer=on"],
                                    ["parallel.pp=2", 'parallel.pp_layout="Ett|t,mL"']], ids=["ep2-distopt", "pp2"])
def test_the_warmup_holds_the_rest_on_every_rank(tmp_path, layout):
    """2 processes: EP = 2 (DP = 2, expert and dense optimizers chained, distributed) and PP = 2 (the
    indexer on the first stage only): during the warm-up no rank's non-indexer parameter changes,
    afterwards every rank's do; all ranks report the same indexer loss."""
    from distributed import run_distributed

    overrides = [*layout, *FAST, "train.global_batch_size=4", "train.eval_interval=0",
                 "model.attention.indexer_warmup_steps=2", f"checkpoint.dir={tmp_path}"]
    ranks = run_distributed("test_indexer_warmup:warmup_worker", {"spec": SPEC, "overrides": overrides})
    for r in ranks:
        assert r["code"] == 0 and [s["iteration"] for s in r["steps"]] == [0, 1, 2]
        assert [s["unchanged"] for s in r["steps"]] == [True, True, False] and r["steps"][0]["held"] > 0
    assert [s["indexer_loss"] for s in ranks[0]["steps"]] == [s["indexer_loss"] for s in ranks[1]["steps"]]
