"""Estimates: the parameter inventory follows the brief's formula; FLOPs, memory, torchrun argv."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dsv4cli.spec.estimate import (
    flops_per_token,
    memory_per_rank,
    padded_vocab_size,
    param_counts,
    param_inventory,
)
from dsv4cli.spec.launch_cmd import torchrun_command
from dsv4cli.spec.layout import ParallelDims, parse_pp_layout
from dsv4cli.spec.load import load_spec

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "specs" / "tiny.toml"
MOE = ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.expert_ffn_hidden_size=64",
       "model.moe.num_shared_experts=1"]


def brief_total(spec) -> int:
    """The team brief's parameter inventory, written out as one closed formula."""
    m = spec.model
    h, heads, n, L, D = m.hidden_size, m.num_attention_heads, m.mhc.streams, m.num_layers, m.mtp.depth
    g = m.num_query_groups or heads
    kv = m.kv_channels or h // heads
    mult = m.vocab_pad_multiple * spec.parallel.tp
    vocab = math.ceil(m.vocab_size / mult) * mult
    attention = (heads + 2 * g) * kv * h + h * heads * kv + 2 * h
    if m.moe is None:
        mlp = 3 * m.ffn_hidden_size * h
    else:
        e, eff, s = m.moe.num_experts, m.moe.expert_ffn_hidden_size, m.moe.num_shared_experts
        mlp = e * h + e * 3 * eff * h + (3 * s * eff * h if s else 0)
    mhc = 2 * ((n * n + 2 * n) * n * h + 3 + (n * n + 2 * n)) if n > 1 else 0
    layer = attention + mlp + mhc
    contraction = (n * n * h + n + 1) if (n > 1 and m.contraction.mode == "learned") else 0
    mtp = D * (2 * h + 2 * h * h + layer + h + contraction)
    output = 0 if m.tie_embeddings else vocab * h
    return vocab * h + L * layer + h + contraction + mtp + output


@pytest.mark.parametrize("overrides", [
    [],
    ["model.mhc.streams=1"],
    ["model.mhc.streams=2", "model.contraction.mode=average"],
    ["model.mtp.depth=0"],
    ["model.mtp.depth=3", "model.tie_embeddings=true"],
    ["model.num_query_groups=2", "model.kv_channels=16", "model.vocab_size=300", "parallel.tp=2"],
    MOE,
    MOE + ["model.moe.num_shared_experts=0", "model.mhc.streams=1"],
], ids=["tiny", "streams1", "average", "no_mtp", "mtp3_tied", "gqa_tp2", "moe", "moe_plain"])
def test_inventory_sums_to_the_brief_formula(overrides):
    spec = load_spec(TINY, overrides)
    inventory = param_inventory(spec)
    assert len({name for name, _ in inventory}) == len(inventory), "duplicate names"
    assert param_counts(spec).total == sum(math.prod(s) for _, s in inventory) == brief_total(spec)


def test_inventory_names_follow_the_checkpoint_key_names():
    names = dict(param_inventory(load_spec(TINY)))
    h, n = 128, 4
    assert names["decoder.hc_head_fn"] == (n, n * h)
    assert names["decoder.hc_head_base"] == (n,) and names["decoder.hc_head_scale"] == (1,)
    assert names["mtp.layers.0.hc_head_fn"] == (n, n * h)
    assert names["mtp.layers.0.e_proj.weight"] == (h, h) and names["mtp.layers.0.h_proj.weight"] == (h, h)
    assert names["decoder.layers.1.self_attention_hyper_connection.mapping_proj.weight"] == (n * n + 2 * n, n * h)
    assert names["decoder.layers.0.mlp_hyper_connection.alpha_res"] == (1,)
    assert names["mtp.layers.0.transformer_layer.mlp_hyper_connection.bias"] == (n * n + 2 * n,)
    assert names["output_layer.weight"] == names["embedding.word_embeddings.weight"] == (256, h)
    assert "mtp.layers.0.eh_proj.weight" not in names


def test_plain_model_has_no_hyper_connection_or_contraction_parameters():
    names = dict(param_inventory(load_spec(TINY, ["model.mhc.streams=1"])))
    assert not [k for k in names if "hyper_connection" in k or "hc_head" in k]
    assert names["mtp.layers.0.eh_proj.weight"] == (128, 256)
    counts = param_counts(load_spec(TINY, ["model.mhc.streams=1"]))
    assert counts.mhc == 0 and counts.contraction == 0


def test_average_contraction_has_no_hc_head_but_keeps_mhc():
    counts = param_counts(load_spec(TINY, ["model.contraction.mode=average"]))
    assert counts.contraction == 0 and counts.mhc > 0


def test_moe_active_params_count_only_top_k_routed_experts():
    spec = load_spec(TINY, MOE)
    counts = param_counts(spec)
    per_expert = 3 * 64 * 128
    layers_with_moe = spec.model.num_layers + spec.model.mtp.depth
    assert counts.routed_experts == layers_with_moe * 8 * per_expert
    assert counts.total - counts.active == layers_with_moe * (8 - 2) * per_expert
    names = dict(param_inventory(spec))
    assert names["decoder.layers.0.mlp.router.weight"] == (8, 128)
    assert names["decoder.layers.0.mlp.experts.local_experts.7.linear_fc1.weight"] == (128, 128)
    assert names["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"] == (128, 64)


def test_padded_vocab():
    assert padded_vocab_size(load_spec(TINY)) == 256
    assert padded_vocab_size(load_spec(TINY, ["model.vocab_size=300"])) == 384
    assert padded_vocab_size(load_spec(TINY, ["model.vocab_size=300", "parallel.tp=2"])) == 512


def test_flops_per_token_follows_the_documented_formula():
    spec = load_spec(TINY, ["model.mhc.streams=1", "model.mtp.depth=0"])
    h, L, s, heads, ffn, V = 128, 2, 128, 4, 352, 256
    matmuls = L * (3 * h * h + h * h + 3 * ffn * h) + V * h
    assert flops_per_token(spec) == 6 * matmuls + 6 * L * s * heads * (h // heads)
    assert flops_per_token(load_spec(TINY)) > flops_per_token(spec)


def test_memory_recompute_and_streams_move_the_estimate_the_right_way():
    base = memory_per_rank(load_spec(TINY))
    mhc = memory_per_rank(load_spec(TINY, ['train.recompute=["mhc"]']))
    full = memory_per_rank(load_spec(TINY, ["train.recompute=full"]))
    plain = memory_per_rank(load_spec(TINY, ["model.mhc.streams=1"]))
    assert base.residual_streams > mhc.residual_streams > 0
    assert base.activations > mhc.activations > full.activations
    assert plain.residual_streams == 0 and plain.activations < base.activations
    assert base.total == base.weights + base.grads + base.optimizer + base.activations


def test_memory_precision_and_distributed_optimizer():
    fp32 = memory_per_rank(load_spec(TINY, ["model.mhc.streams=1"]))
    bf16 = memory_per_rank(load_spec(TINY, ["model.mhc.streams=1", "train.precision=bf16"]))
    assert bf16.weights * 2 == fp32.weights
    assert fp32.optimizer == 8 * fp32.params and bf16.optimizer == 12 * bf16.params
    dp4 = memory_per_rank(load_spec(TINY, ["model.mhc.streams=1"]), world_size=4)
    assert dp4.distributed_optimizer and dp4.optimizer == fp32.optimizer // 4


def test_tensor_parallel_splits_the_weights():
    one = memory_per_rank(load_spec(TINY, ["model.mhc.streams=1"]))
    two = memory_per_rank(load_spec(TINY, ["model.mhc.streams=1", "parallel.tp=2"]), world_size=2)
    assert 0.4 * one.params < two.params < 0.6 * one.params


def test_parallel_dims_of_the_single_node_spec():
    sizes = ParallelDims.of(load_spec(REPO / "specs" / "model.toml"))
    assert (sizes.world, sizes.tp, sizes.dp, sizes.ep, sizes.edp) == (8, 2, 4, 4, 2)
    assert sizes.num_microbatches == 256 // (2 * 4)


def test_pp_layout_parser_matches_megatron_grammar():
    assert parse_pp_layout("Et*3|(tt|)*2,m|L") == ["Ettt", "tt", "tt", "m", "L"]
    with pytest.raises(ValueError, match="'x'"):
        parse_pp_layout("Etx|L")


def test_torchrun_command_uses_launch_settings_and_overrides():
    spec = load_spec(REPO / "specs" / "dsv4-flash.toml")
    argv = torchrun_command(spec, "specs/dsv4-flash.toml", node_rank=3, overrides=["train.steps=10"])
    assert argv == [
        "torchrun", "--nnodes", "16", "--nproc-per-node", "8", "--node-rank", "3",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29500",
        "-m", "dsv4cli.train.entry", "specs/dsv4-flash.toml", "--set", "train.steps=10",
    ]
    argv = torchrun_command(spec, "x.toml", nproc_per_node=2, nnodes=1, rdzv_endpoint="h:1",
                            launcher=["python", "-m", "torch.distributed.run"])
    assert argv[:9] == ["python", "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                        "--node-rank", "0"]
    assert "h:1" in argv


def test_public_dsv4_sizes_land_near_the_published_totals():
    flash = param_counts(load_spec(REPO / "specs" / "dsv4-flash.toml"))
    pro = param_counts(load_spec(REPO / "specs" / "dsv4-pro.toml"))
    assert 250e9 < flash.total < 320e9 and 10e9 < flash.active < 16e9
    assert 1.4e12 < pro.total < 1.8e12 and 40e9 < pro.active < 60e9


@pytest.mark.slow
def test_pp_layouts_parse_like_megatron_and_pass_its_layout_check():
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    chars = {LayerType.embedding: "E", LayerType.decoder: "t", LayerType.mtp: "m", LayerType.loss: "L"}
    for layout in ["Et*3|(tt|)*2,m|L", "E|t|tmL", "Ettt|tt|tt|tmL"]:
        theirs = PipelineParallelLayerLayout.parse_str_to_list(layout)
        assert parse_pp_layout(layout) == ["".join(chars[c] for c in stage) for stage in theirs]
    for name in ("dsv4-flash.toml", "dsv4-pro.toml"):
        spec = load_spec(REPO / "specs" / name)
        layout = PipelineParallelLayerLayout(spec.parallel.pp_layout, spec.parallel.pp)
        layout.validate_layer_layout(num_layers=spec.model.num_layers, mtp_num_layers=spec.model.mtp.depth)
        assert layout.virtual_pipeline_model_parallel_size == spec.parallel.vpp
