"""The no-aux-loss expert bias of DeepSeek-V4's top-k routers (dsv4cli.model.dsv4.expert_bias):
it moves against the load, equals a plain reference computed from the counts, is identical on every
rank of a multi-process run, is saved and resumes bit-exactly; specs without it log as before."""

from __future__ import annotations

import pytest
import torch

from test_train_e2e import REPO, cli, losses, metrics, write_small_spec

SPEC = str(REPO / "specs" / "tiny-dsv4.toml")
E, H = 4, 8


def _router(rate: float):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from dsv4cli.model.dsv4.router import SqrtSoftplusTopKRouter

    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, num_moe_experts=E, moe_router_topk=2,
                               moe_router_bias_update_rate=rate, moe_router_score_function="sqrtsoftplus",
                               add_bias_linear=False, use_cpu_initialization=True)
    router = SqrtSoftplusTopKRouter(config)
    router.set_layer_number(1)
    return router, config


def test_update_equals_a_plain_reference_from_the_counts(megatron_1proc):
    """bias_e += rate * sign(mean - count_e), per layer; a layer with even load keeps its bias."""
    from dsv4cli.model.dsv4.expert_bias import max_over_mean, updated_bias

    counts = torch.tensor([[9.0, 1.0, 3.0, 3.0], [4.0, 4.0, 4.0, 4.0], [0.0, 2.0, 5.0, 1.0]])
    bias = torch.randn(3, E)
    rate = 0.25
    want = bias.clone()
    for layer in range(3):
        mean = sum(counts[layer].tolist()) / E
        for e in range(E):
            c = counts[layer, e].item()
            want[layer, e] += rate if c < mean else -rate if c > mean else 0.0
    assert torch.equal(updated_bias(counts, bias, rate), want)
    assert max_over_mean(counts).tolist() == pytest.approx([9 / 4, 1.0, 5 / 2])


def test_skewed_router_bias_moves_against_the_skew_and_balances(megatron_1proc):
    """Weights that make expert 0 win every token: its bias falls, the others rise, the load
    evens out; the update is the reference of the counts the router collected; counts reset;
    eval (no grad) forwards do not count; rate 0 freezes the bias."""
    from dsv4cli.model.dsv4.expert_bias import update_expert_bias, updated_bias

    torch.manual_seed(0)
    router, config = _router(rate=0.05)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
        router.weight[0] = 0.0
        router.weight[0, 0] = 2.0  # expert 0's logit ~ 6: it wins every token
    x = torch.randn(16, 2, H)
    x[..., 0] += 3.0
    with torch.no_grad():
        router(x)  # an eval forward: not counted
    assert router.local_tokens_per_expert.sum().item() == 0

    router(x)
    counts = router.local_tokens_per_expert.clone()
    assert counts[0].item() == 32  # every token chose expert 0
    before = router.expert_bias.clone()
    loads = update_expert_bias([router], config)
    assert torch.equal(router.expert_bias, updated_bias(counts[None], before[None], 0.05)[0])
    assert loads == [pytest.approx(counts.max().item() / counts.mean().item())] and loads[0] == 2.0
    assert router.local_tokens_per_expert.sum().item() == 0
    assert router.expert_bias[0] < 0 and (router.expert_bias[counts < counts.mean()] > 0).all()

    for _ in range(60):
        router(x)
        loads = update_expert_bias([router], config)
    assert loads[0] < 1.5, loads  # the bias pulled tokens away from expert 0

    frozen, cfg0 = _router(rate=0.0)
    frozen(x)
    assert update_expert_bias([frozen], cfg0)[0] > 1.0 and torch.equal(frozen.expert_bias, torch.zeros(E))


def bias_worker(args: dict) -> dict:
    """Per-rank body for tests/distributed.py: the real entry point, recording every rank's biases
    after each update."""
    import dsv4cli.model.dsv4.expert_bias as eb
    from dsv4cli.train.entry import run

    seen, real = [], eb.update_expert_bias

    def spy(routers, config, **kwargs):
        loads = real(routers, config, **kwargs)
        seen.append({"bias": {r.layer_number: r.expert_bias.tolist() for r in routers}, "loads": loads})
        return loads

    eb.update_expert_bias = spy
    return {"code": run(args["spec"], args["overrides"]), "steps": seen}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.ep=2"], ["parallel.pp=2", 'parallel.pp_layout="Ett|t,mL"']],
                         ids=["ep2", "pp2"])
def test_every_rank_holds_the_same_bias(tmp_path, layout):
    """EP = 2 (so DP = 2: the ranks route different tokens) on tiny-dsv4: after each step every
    rank holds the identical, moved bias and reports the same loads. PP = 2: each stage holds its
    own layers' biases and both report the loads of all layers."""
    from distributed import run_distributed

    overrides = [*layout, "train.steps=3", "train.eval_interval=0", "train.micro_batch_size=2",
                 "train.global_batch_size=4", "model.moe.expert_bias_update_rate=0.01", f"checkpoint.dir={tmp_path}"]
    r0, r1 = run_distributed("test_train_expert_bias:bias_worker", {"spec": SPEC, "overrides": overrides})
    assert r0["code"] == r1["code"] == 0
    assert len(r0["steps"]) == len(r1["steps"]) == 3
    pipelined = "parallel.pp=2" in layout
    for a, b in zip(r0["steps"], r1["steps"]):
        assert a["loads"] == b["loads"]
        if pipelined:
            assert sorted(a["bias"]) == ["2"] and sorted(b["bias"]) == ["3", "4"]
        else:
            assert a["bias"] == b["bias"]
    last = {**r0["steps"][-1]["bias"], **r1["steps"][-1]["bias"]}
    assert sorted(last) == ["2", "3", "4"]  # (JSON keys) CSA, HCA and the MTP layer; layer 1 is hash-routed
    assert all(any(v != 0 for v in bias) for bias in last.values())
    loads = r0["steps"][-1]["loads"]
    assert len(loads) == 3 and all(v >= 1.0 for v in loads)
    assert metrics(tmp_path)[-1]["moe_load_max_over_mean"] == pytest.approx(loads)


@pytest.mark.slow
def test_resume_mid_run_is_bit_exact_with_the_bias(tmp_path):
    """tiny-dsv4 stopped by exit_interval and resumed: the same losses and loads per step and the
    same (moved) biases in the last checkpoint as a straight run."""
    from dsv4cli.ckpt.tensors import load_all_tensors

    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--set", "train.steps=4", "--set", "train.eval_interval=0", "--set", "train.log_interval=1",
              "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2",
              "--set", "model.moe.expert_bias_update_rate=0.01"]
    assert cli("train", SPEC, *common, "--set", f"checkpoint.dir={straight}").exit_code == 0
    first = cli("train", SPEC, *common, "--set", f"checkpoint.dir={split}", "--set", "train.exit_interval=2")
    assert first.exit_code == 0, first.output
    assert sorted(losses(split)) == [1, 2]
    assert cli("train", SPEC, *common, "--set", f"checkpoint.dir={split}").exit_code == 0
    a, b = metrics(straight), metrics(split)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("loss", "mtp_losses", "grad_norm", "moe_load_max_over_mean"):
            assert x[key] == y[key], (x["step"], key)
    ta, tb = load_all_tensors(straight / "iter_0000004"), load_all_tensors(split / "iter_0000004")
    biases = sorted(k for k in ta if k.endswith("router.expert_bias"))
    assert len(biases) == 3
    for k in biases:
        assert torch.equal(ta[k], tb[k]) and ta[k].abs().sum() > 0, k


def test_a_spec_without_expert_bias_logs_no_load_and_never_updates(tmp_path, monkeypatch):
    """Dense spec: no `moe_load_max_over_mean`, the update never runs (losses as before)."""
    import dsv4cli.model.dsv4.expert_bias as eb

    def boom(*_):
        raise AssertionError("update_expert_bias called for a model without expert bias")

    monkeypatch.setattr(eb, "update_expert_bias", boom)
    spec, run = write_small_spec(tmp_path), tmp_path / "run"
    r = cli("train", str(spec), "--set", "train.steps=1", "--set", "train.eval_interval=0", "--set", f"checkpoint.dir={run}")
    assert r.exit_code == 0, r.output
    assert "moe_load_max_over_mean" not in metrics(run)[-1] and "moe load" not in r.stdout


def test_rate_validation_and_warning():
    from dsv4cli.spec.problems import SpecError
    from dsv4cli.spec.load import load_spec

    with pytest.raises(SpecError):
        load_spec(SPEC, ["model.moe.expert_bias_update_rate=-1"])
    from dsv4cli.spec.schema import MoeSpec

    assert MoeSpec(num_experts=4, top_k=2, expert_ffn_hidden_size=8).expert_bias_update_rate == 1e-3  # DeepSeek's
    assert load_spec(SPEC).model.moe.expert_bias_update_rate == 0.01  # tiny-dsv4: a faster rate for its short run
    r = cli("validate", SPEC, "--set", 'model.moe.score_function="softmax"', "--set", "model.moe.hash_layers=0",
            "--set", "model.moe.expert_bias_update_rate=0.01")
    assert "expert_bias_update_rate" in r.output and "no effect" in r.output


def test_progress_line_shows_the_worst_layer():
    from dsv4cli.train.metrics import format_line

    rec = {"step": 3, "loss": 2.0, "lr": 1e-3, "moe_load_max_over_mean": [1.25, 1.75, 1.5]}
    assert "moe load max/mean 1.75" in format_line(rec, 10)
    assert "moe load" not in format_line({**rec, "moe_load_max_over_mean": None}, 10)
