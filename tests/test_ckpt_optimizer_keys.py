"""One definition of optimizer state (dsv4cli.ckpt.keys.is_optimizer_key) for every format megatron-core
writes, and the tools that use it: inspect's tree, convert's new entries under a chained prefix, and
the resume's key resolution across ChainedOptimizer forms."""

from __future__ import annotations

import json

import pytest

from dsv4cli.ckpt.keys import is_optimizer_key, parse_optimizer_key, split_optimizer_key

OPTIMIZER_NAMES = [
    "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight",  # non-distributed / fully_reshardable
    "optimizer.state.fp32_param.embedding.word_embeddings.weight",  # bf16 main copy / fs_model_space
    "optimizer.state.param.output_layer.weight",  # fully_reshardable main copy
    "chained_0.optimizer.state.exp_avg_sq.decoder.final_layernorm.weight",  # MoE: ChainedOptimizer
    "chained_1.optimizer.state.exp_avg.decoder.layers.mlp.experts.experts.linear_fc1.weight",
    "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.float32, torch.float32).bucket_idx_0.exp_avg",
    "chained_1.optimizer.distributed.dp_group_idx_3.per_bucket_numel/shard_0_1",  # dp_reshardable object
    "optimizer.distributed.dp_group_idx_0.param_state/shard_0_1",  # dp_zero_gather_scatter object
    "chained_12.optimizer.distributed.dp_group_idx_0.optimizer/shard_0_1",
]
MODEL_NAMES = [
    "decoder.layers.mlp.experts.experts.linear_fc1.weight", "rng_state/shard_0_2", "embedding.word_embeddings.weight",
    "decoder.layers.self_attention.linear_qkv._extra_state/shard_0_2", "chained_0.decoder.weight",
    "mtp.layers.0.optimizer.state.weight",
]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_megatron_optimizer_format_is_optimizer_state(name):
    assert is_optimizer_key(name)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_and_other_names_are_not_optimizer_state(name):
    assert not is_optimizer_key(name)


def test_per_parameter_keys_parse_with_their_prefix():
    k = parse_optimizer_key(OPTIMIZER_NAMES[4])
    assert (k.prefix, k.state, k.param) == ("chained_1.", "exp_avg", "decoder.layers.mlp.experts.experts.linear_fc1.weight")
    assert k.name == OPTIMIZER_NAMES[4]
    assert split_optimizer_key(OPTIMIZER_NAMES[3]) == ("exp_avg_sq", "decoder.final_layernorm.weight")
    assert parse_optimizer_key(OPTIMIZER_NAMES[5]) is None and parse_optimizer_key(MODEL_NAMES[0]) is None


def test_inspect_groups_chained_and_bucketed_state_apart_from_the_model():
    from dsv4cli.ckpt.report import module_group

    assert module_group(OPTIMIZER_NAMES[3]) == "chained_0.optimizer.state.exp_avg_sq"
    assert module_group(OPTIMIZER_NAMES[6]) == "chained_1.optimizer.distributed.dp_group_idx_3"
    assert module_group(OPTIMIZER_NAMES[0]) == "optimizer.state.exp_avg"
    assert module_group(MODEL_NAMES[1]) == "rng_state/shard_0_2"


@pytest.fixture
def chained_legacy(tmp_path, tiny_spec):
    """A legacy MoE checkpoint whose optimizer state a ChainedOptimizer (bf16: with fp32_param) wrote."""
    from dsv4cli.ckpt.synthetic import write_synthetic_checkpoint

    spec = tiny_spec(**{"model.contraction.mode": "average", "model.moe": {
        "num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 16}})
    root = tmp_path / "legacy"
    write_synthetic_checkpoint(root, spec, iteration=5, chained=True, states=("exp_avg", "exp_avg_sq", "fp32_param"))
    return root


def test_convert_adds_optimizer_entries_under_the_chained_prefix(chained_legacy, tmp_path):
    import torch

    from dsv4cli.ckpt.convert import contraction_base
    from dsv4cli.ckpt.tensors import load_all_tensors
    from test_ckpt_convert import run

    r = run("inspect", "checkpoint", str(chained_legacy), "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["legacy"] and not any(p["kind"] == "unexpected" for p in rep["problems"]), rep["problems"]
    dst = tmp_path / "learned"
    r = run("convert-ckpt", str(chained_legacy), str(dst), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["optimizer_states"] == ["exp_avg", "exp_avg_sq", "fp32_param"]
    t = load_all_tensors(dst / "iter_0000005")
    for block in ("decoder.", "mtp.layers.0."):
        base = t[f"{block}hc_head_base"]
        assert torch.allclose(base, torch.full_like(base, contraction_base(4, 1e-6)))
        for state in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(t[f"chained_0.optimizer.state.{state}.{block}hc_head_fn"]) == 0
        assert torch.equal(t[f"chained_0.optimizer.state.fp32_param.{block}hc_head_base"], base)
    assert not any(k.startswith(("optimizer.", "chained_1.")) and "hc_head" in k for k in t)
    r = run("inspect", "checkpoint", str(dst), "--json")
    assert json.loads(r.stdout)["conformant"]


def test_drop_optimizer_drops_chained_state(chained_legacy, tmp_path):
    from dsv4cli.ckpt.tensors import load_all_tensors
    from test_ckpt_convert import run

    dst = tmp_path / "model_only"
    r = run("convert-ckpt", str(chained_legacy), str(dst), "--drop-optimizer", "--json")
    assert r.exit_code == 0, r.output
    assert not any(is_optimizer_key(k) for k in load_all_tensors(dst / "iter_0000005"))


def test_resume_points_requested_keys_at_the_stored_prefix():
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from dsv4cli.ckpt.optimizer_resume import chain_length, mismatch_lines, resolve_keys

    stored = {"chained_0.optimizer.state.exp_avg.a.weight": (2,), "optimizer.state.exp_avg.b.weight": (3,)}
    sd = {0: {"state": {0: {"exp_avg": ShardedTensor.from_rank_offsets("optimizer.state.exp_avg.a.weight",
                                                                        torch.zeros(2))}}},
          1: {"state": {0: {"exp_avg": ShardedTensor.from_rank_offsets("chained_1.optimizer.state.exp_avg.b.weight",
                                                                        torch.zeros(3))},
                        1: {"exp_avg": ShardedTensor.from_rank_offsets("optimizer.state.exp_avg.c.weight",
                                                                        torch.zeros(1))}}}}
    resolve_keys(sd, stored)
    assert sd[0]["state"][0]["exp_avg"].key == "chained_0.optimizer.state.exp_avg.a.weight"
    assert sd[1]["state"][0]["exp_avg"].key == "optimizer.state.exp_avg.b.weight"
    wanted = {"chained_0.optimizer.state.exp_avg.a.weight": (4,), "optimizer.state.exp_avg.c.weight": (1,)}
    assert mismatch_lines(stored, set(), wanted, {"x/shard_0_1"}) == [
        "missing: optimizer.state.exp_avg.c.weight [1]",
        "mis-shaped: chained_0.optimizer.state.exp_avg.a.weight: checkpoint [2], optimizer [4]",
        "missing: x/shard_0_1"]
    assert chain_length({0: {}, 1: {}}) == 2 and chain_length({"state": {}, "param_groups": []}) == 1
