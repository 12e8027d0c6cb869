"""`specs/tiny-dsv4.toml` (every DeepSeek-V4 attention kind, sqrtsoftplus MoE with a shared expert and a
hash-routed layer, the SwiGLU clamp, mHC, MTP) trains on CPU in one process and resumes bit-exactly."""

from __future__ import annotations

import pytest

from test_train_e2e import REPO, cli, losses, metrics

SPEC = str(REPO / "specs" / "tiny-dsv4.toml")


def test_tiny_dsv4_spec_builds_every_deepseek_v4_block(megatron_1proc):
    """The spec's layers: sliding + hash router, CSA (compressor + indexer choosing fewer entries than
    there are), HCA, and a sliding MTP layer; clamped experts; no megatron rotary embedding."""
    import torch

    from dsv4cli.build import build_model
    from dsv4cli.model.dsv4.router import HashRouter, SqrtSoftplusTopKRouter
    from dsv4cli.spec.load import load_spec

    spec = load_spec(SPEC)
    torch.manual_seed(0)
    model = build_model(spec)
    layers = [*model.decoder.layers, model.mtp.layers[0].transformer_layer]
    kinds = [(layer.self_attention.settings.kind, layer.self_attention.settings.compress_ratio) for layer in layers]
    assert kinds == [("sliding", 0), ("compressed_sparse", 4), ("heavily_compressed", 16), ("sliding", 0)]
    routers = [type(layer.mlp.router) for layer in layers]
    assert routers == [HashRouter, SqrtSoftplusTopKRouter, SqrtSoftplusTopKRouter, SqrtSoftplusTopKRouter]
    assert model.decoder.needs_token_ids and [layer.needs_token_ids for layer in layers] == [True, False, False, False]
    assert all(layer.mlp.shared_experts is not None for layer in layers)
    assert model.config.activation_func_clamp_value == spec.model.moe.swiglu_limit == 10.0
    assert not model.config.bias_activation_fusion
    assert getattr(model, "rotary_pos_emb", None) is None
    attention = spec.model.attention
    assert spec.model.seq_length // 4 > attention.index_topk  # a real top-k choice

    # the saved buffers (router tables and biases) are what checkpoint conformance expects
    from dsv4cli.build.dsv4_specs import buffer_inventory

    params = dict(model.named_parameters())
    buffers = sorted((n, tuple(t.shape)) for n, t in model.state_dict().items()
                     if n not in params and not n.endswith("_extra_state"))
    assert buffers == sorted(buffer_inventory(spec)) and len(buffers) == 4

    # checkpoint keys (docs/model.md): one per layer, not stacked; router buffers saved
    keys = {getattr(v, "key", k) for k, v in model.sharded_state_dict().items()}
    for key in ("decoder.layers.0.input_layernorm.weight", "decoder.layers.0.self_attention.sinks",
                "decoder.layers.0.mlp.router.tid2eid", "decoder.layers.1.mlp.router.expert_bias",
                "decoder.layers.1.self_attention.indexer.compressor.position_bias",
                "decoder.layers.2.self_attention.compressor.linear_gate.weight",
                "decoder.layers.2.mlp.experts.experts.linear_fc2.weight",
                "decoder.layers.2.mlp.shared_experts.linear_fc2.weight",
                "mtp.layers.0.transformer_layer.self_attention.linear_o_down.weight"):
        assert key in keys, key
    assert not any(k.startswith("decoder.layers.self_attention") for k in keys)
    assert "decoder.layers.0.mlp.router.expert_bias" not in keys  # hash layer: no bias
    assert not any(k.startswith(("decoder.layers.2.self_attention.indexer", "decoder.layers.0.self_attention.compressor"))
                   for k in keys)  # HCA: no indexer; sliding: no compressor


@pytest.mark.slow
def test_tiny_dsv4_trains_with_falling_held_out_loss(tmp_path):
    run = tmp_path / "run"
    r = cli("train", SPEC, "--set", "train.steps=40", "--set", "train.warmup_steps=3",
            "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=4",
            "--set", "train.log_interval=10", "--set", "train.eval_interval=20", "--set", "train.eval_batches=2",
            "--set", f"checkpoint.dir={run}", "--set", "checkpoint.interval=40")
    assert r.exit_code == 0, r.output
    recs = metrics(run)
    evals = [x["eval_loss"] for x in recs if "eval_loss" in x]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.1, evals
    assert recs[-1]["loss"] < recs[0]["loss"], [x["loss"] for x in recs]
    assert all(len(x["mtp_losses"]) == 1 for x in recs)
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "40"


@pytest.mark.slow
def test_eval_accepts_a_checkpoint_with_router_buffers(tmp_path):
    """`dsv4 eval`'s conformance check expects the saved router buffers (tid2eid, expert_bias): a
    sqrtsoftplus / hash-routed MoE run evaluates (exit 0) to the held-out loss it logged."""
    import json

    from test_train_e2e import write_small_spec

    moe = ('model.moe={num_experts=4, top_k=2, expert_ffn_hidden_size=16, num_shared_experts=1, '
           'score_function="sqrtsoftplus", hash_layers=1, swiglu_limit=1.0}')
    spec, run = write_small_spec(tmp_path), tmp_path / "run"
    r = cli("train", str(spec), "--set", moe, "--set", "train.steps=2", "--set", f"checkpoint.dir={run}")
    assert r.exit_code == 0, r.output
    ev = cli("eval", str(spec), "--set", moe, "--load", str(run), "--batches", "1", "--json")
    assert ev.exit_code == 0, ev.output
    out = json.loads(ev.stdout.strip().splitlines()[-1])
    assert abs(out["loss"] - metrics(run)[-1]["eval_loss"]) <= 1e-6


def straight_and_resumed(tmp_path, common: list[str]) -> tuple[list[dict], list[dict], object]:
    """tiny-dsv4 for 4 steps (`common` --set items) straight, and stopped by exit_interval after step 2
    then resumed -> (straight metrics, stopped+resumed metrics, the resuming run's CLI result)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli("train", SPEC, *common, "--set", f"checkpoint.dir={straight}").exit_code == 0
    first = cli("train", SPEC, *common, "--set", f"checkpoint.dir={split}", "--set", "train.exit_interval=2")
    assert first.exit_code == 0, first.output
    assert sorted(losses(split)) == [1, 2]
    second = cli("train", SPEC, *common, "--set", f"checkpoint.dir={split}")
    assert second.exit_code == 0, second.output
    assert "resumed from" in second.stdout
    a, b = metrics(straight), metrics(split)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4]
    return a, b, second


@pytest.mark.slow
def test_tiny_dsv4_resume_after_exit_interval_is_bit_exact(tmp_path):
    common = ["--set", "train.steps=4", "--set", "train.eval_interval=2", "--set", "train.eval_batches=1",
              "--set", "train.log_interval=1", "--set", "train.warmup_steps=1",
              "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2"]
    a, b, _ = straight_and_resumed(tmp_path, common)
    for x, y in zip(a, b):
        for key in ("loss", "mtp_losses", "grad_norm", "lr", "eval_loss"):
            assert x.get(key) == y.get(key), (x["step"], key, x.get(key), y.get(key))


def test_deepseek_v4_fp32_parameters_stay_fp32_under_bf16(megatron_1proc):
    """Mixed precision casts the model with `.bfloat16()`; DeepSeek keeps sinks, position biases, norm
    weights and the expert bias in fp32 (HF's reference too): they stay fp32 and a bf16 forward runs."""
    import torch

    from dsv4cli.build import build_model
    from dsv4cli.spec.load import load_spec

    torch.manual_seed(0)
    model = build_model(load_spec(SPEC)).bfloat16()
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    for name in ("decoder.layers.1.self_attention.sinks", "decoder.layers.1.self_attention.q_norm.weight",
                 "decoder.layers.1.self_attention.compressor.position_bias",
                 "decoder.layers.1.self_attention.indexer.compressor.norm.weight",
                 "decoder.layers.2.self_attention.kv_norm.weight"):
        assert name in fp32, name
    assert model.decoder.layers[0].self_attention.linear_kv.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        logits = model(ids, torch.arange(64)[None], None)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert model.decoder.layers[1].mlp.router.expert_bias.dtype == torch.float32  # restored by the router
