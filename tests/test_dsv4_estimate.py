"""DeepSeek-V4 estimates of `dsv4 validate` ([model.attention] specs): the parameter total equals HF's
`DeepseekV4ForCausalLM` on the meta device (MTP apart), the inventory names the modules
`dsv4cli.model.dsv4` builds, FLOPs follow the documented formulas, memory counts fp32 parameters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf
from typer.testing import CliRunner

from dsv4cli.cli import app
from dsv4cli.spec import dsv4_estimate
from dsv4cli.spec.dsv4_params import count_dsv4_params
from dsv4cli.spec.estimate import flops_per_token, memory_per_rank, param_counts, param_inventory
from dsv4cli.spec.load import load_spec

REPO = Path(__file__).resolve().parents[1]
FLASH = REPO / "specs" / "dsv4-flash.toml"
FLASH_RATIOS = [0, 0, 4] + [128, 4] * 20 + [0]  # 43 decoder layers + the MTP layer
HF_TYPE = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention"}

# Every attention kind, non-release ratios, a hash layer, MTP depth 1 (an 'hca' MTP layer).
TINY = """\
name = "tiny-dsv4-estimate"
[model]
num_layers = 4
hidden_size = 32
num_attention_heads = 4
ffn_hidden_size = 64
vocab_size = 256
seq_length = 64
[model.mhc]
streams = 3
[model.mtp]
depth = 1
[model.attention]
layer_types = ["sliding", "csa", "hca", "csa", "hca"]
compress_ratios = [0, 4, 8, 4, 8]
head_dim = 16
rope_head_dim = 4
q_lora_rank = 12
o_groups = 2
o_lora_rank = 10
sliding_window = 8
index_n_heads = 3
index_head_dim = 8
index_topk = 5
[model.moe]
num_experts = 5
top_k = 2
num_shared_experts = 1
expert_ffn_hidden_size = 14
score_function = "sqrtsoftplus"
hash_layers = 1
swiglu_limit = 10.0
[train]
global_batch_size = 1
[data]
source = "mock"
"""


def hf_meta_count(config: DeepseekV4Config) -> int:
    with torch.device("meta"):
        model = hf.DeepseekV4ForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def hf_config_of(spec) -> DeepseekV4Config:
    """HF's configuration with the spec's numbers (decoder layers only: HF has no MTP)."""
    m, a, moe = spec.model, spec.model.attention, spec.model.moe
    layers = m.num_layers
    rates = {HF_TYPE[t]: r for t, r in zip(a.layer_types, a.ratios()) if t != "sliding"}
    return DeepseekV4Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_hidden_layers=layers, head_dim=a.head_dim, q_lora_rank=a.q_lora_rank, o_groups=a.o_groups,
        o_lora_rank=a.o_lora_rank, index_n_heads=a.index_n_heads, index_head_dim=a.index_head_dim,
        index_topk=a.index_topk, sliding_window=a.sliding_window, n_routed_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k, n_shared_experts=moe.num_shared_experts,
        moe_intermediate_size=moe.expert_ffn_hidden_size, hc_mult=m.mhc.streams,
        layer_types=[HF_TYPE[t] for t in a.layer_types[:layers]], compress_rates=rates,
        mlp_layer_types=["hash_moe"] * moe.hash_layers + ["moe"] * (layers - moe.hash_layers),
        qk_rope_head_dim=a.rope_head_dim, tie_word_embeddings=m.tie_embeddings,
    )


def validate_json(path) -> dict:
    result = CliRunner().invoke(app, ["validate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write(tmp_path: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------
def test_flash_validate_total_equals_hf_count_and_mtp_is_apart():
    params = validate_json(FLASH)["summary"]["params"]
    config = DeepseekV4Config(compress_ratios=FLASH_RATIOS)
    theirs = hf_meta_count(config)
    assert abs(params["total"] - theirs) <= 1e-6 * theirs, (params["total"], theirs)
    # MTP: one sliding layer + its projections, norms and contraction, from the independent count
    sizes = dsv4_estimate.sizes(load_spec(FLASH))
    kinds = [{0: "sliding", 4: "csa", 128: "hca"}[r] for r in FLASH_RATIOS]
    counts = count_dsv4_params(sizes, vocab_size=config.vocab_size, attention_kinds=kinds,
                               compress_ratios=FLASH_RATIOS, mtp_depth=1)
    assert params["mtp"] == counts.mtp.total > 0
    assert params["total"] == counts.total
    assert params["active"] < params["total"] - params["routed_experts"] * 0.9


def test_tiny_spec_total_equals_hf_count_of_the_same_numbers(tmp_path):
    path = write(tmp_path)
    spec = load_spec(path)
    params = validate_json(path)["summary"]["params"]
    theirs = hf_meta_count(hf_config_of(spec))
    assert params["total"] == theirs
    layer_types = spec.model.attention.layer_types
    counts = count_dsv4_params(dsv4_estimate.sizes(spec), vocab_size=256, attention_kinds=layer_types,
                               compress_ratios=spec.model.attention.ratios(), mtp_depth=1)
    assert params["mtp"] == counts.mtp.total > 0
    # the inventory (what the builder is checked against) sums to the same numbers
    inventory = param_inventory(spec)
    assert sum(math.prod(s) for n, s in inventory if not n.startswith("mtp.")) == theirs
    assert sum(math.prod(s) for n, s in inventory if n.startswith("mtp.")) == params["mtp"]


def test_pro_total_equals_hf_count_of_its_numbers():
    spec = load_spec(REPO / "specs" / "dsv4-pro.toml")
    theirs = hf_meta_count(hf_config_of(spec))
    assert param_counts(spec).total == theirs
    assert 1.4e12 < theirs < 1.7e12


def test_a_spec_without_attention_still_counts_mtp_in_the_total(tmp_path):
    base = TINY.split("[model.attention]")[0] + "[train]\nglobal_batch_size = 1\n"
    spec = load_spec(write(tmp_path, base))
    counts, names = param_counts(spec), param_inventory(spec)
    assert counts.total == sum(math.prod(s) for _, s in names) and counts.mtp > 0


@pytest.mark.parametrize("kind,ratio", [("sliding", 0), ("csa", 4), ("hca", 8)])
def test_attention_inventory_names_the_parameters_of_the_built_module(tmp_path, kind, ratio):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from dsv4cli.model.dsv4.attention import Dsv4Attention
    from dsv4cli.model.dsv4.attention_settings import Dsv4AttentionSettings

    spec = load_spec(write(tmp_path))
    index = list(zip(spec.model.attention.layer_types, spec.model.attention.ratios())).index((kind, ratio))
    a = spec.model.attention
    settings = Dsv4AttentionSettings(
        kind={"sliding": "sliding", "csa": "compressed_sparse", "hca": "heavily_compressed"}[kind],
        compress_ratio=ratio, q_lora_rank=a.q_lora_rank, head_dim=a.head_dim, rope_head_dim=a.rope_head_dim,
        o_groups=a.o_groups, o_lora_rank=a.o_lora_rank, sliding_window=a.sliding_window,
        index_n_heads=a.index_n_heads, index_head_dim=a.index_head_dim, index_topk=a.index_topk,
    )
    config = TransformerConfig(num_layers=1, hidden_size=spec.model.hidden_size,
                               num_attention_heads=spec.model.num_attention_heads, use_cpu_initialization=True)
    built = {name: tuple(p.shape) for name, p in Dsv4Attention(config, settings).named_parameters()}
    assert dict(dsv4_estimate.attention_inventory(spec, "x", index)) == {f"x.{k}": v for k, v in built.items()}


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s,window,kind,ratio,topk", [
    (64, 8, "sliding", 0, 0), (5, 8, "sliding", 0, 0), (64, 8, "hca", 8, 0), (67, 8, "hca", 6, 0),
    (64, 8, "csa", 4, 5), (64, 8, "csa", 4, 100), (61, 3, "csa", 3, 7),
])
def test_key_counts_equal_a_count_over_every_position(s, window, kind, ratio, topk):
    keys = sum(min(t + 1, window) for t in range(s)) / s
    visible = [(t + 1) // ratio if ratio else 0 for t in range(s)]
    entries = {"sliding": 0, "hca": sum(visible), "csa": sum(min(topk, v) for v in visible)}[kind] / s
    assert dsv4_estimate.key_counts(s, window, kind, ratio, topk) == pytest.approx(
        (keys, entries, sum(visible) / s if kind != "sliding" else 0.0), rel=1e-12)


def test_flops_follow_window_entries_and_indexer(tmp_path):
    spec = load_spec(write(tmp_path))
    heads, d, s, layers = 4, 16, 64, 5
    wider = load_spec(write(tmp_path), ["model.attention.sliding_window=16"])
    # every layer (MTP included) reads 16 instead of 8 local keys for t >= 8
    extra = sum(min(t + 1, 16) - min(t + 1, 8) for t in range(s)) / s
    assert flops_per_token(wider) - flops_per_token(spec) == pytest.approx(3 * 4 * heads * d * extra * layers, abs=2)
    # a top-k that keeps every entry: 'csa' layers read all visible entries (and the indexer is unchanged)
    all_k = load_spec(write(tmp_path), ["model.attention.index_topk=1000"])
    visible = [(t + 1) // 4 for t in range(s)]
    gained = sum(v - min(5, v) for v in visible) / s
    assert flops_per_token(all_k) - flops_per_token(spec) == pytest.approx(3 * 4 * heads * d * gained * 2, abs=2)


def test_sliding_window_over_the_whole_sequence_is_causal_attention(tmp_path):
    text = TINY.replace('layer_types = ["sliding", "csa", "hca", "csa", "hca"]\ncompress_ratios = [0, 4, 8, 4, 8]',
                        'layer_types = ["sliding", "sliding", "sliding", "sliding", "sliding"]')
    spec = load_spec(write(tmp_path, text), ["model.attention.sliding_window=64"])
    core = dsv4_estimate.attention_flops_per_token(spec)
    assert text != TINY
    assert core == pytest.approx(6 * 5 * 4 * 16 * (64 + 1))  # 3 x 4*H*d x mean_t (t + 1), 5 layers


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def test_sinks_and_position_biases_stay_fp32_under_bf16(tmp_path):
    spec = load_spec(write(tmp_path), ["model.mhc.streams=1", "train.precision=bf16"])
    fp32 = sum(math.prod(s) for n, s in param_inventory(spec) if n.endswith(dsv4_estimate.FP32_PARAMS))
    memory = memory_per_rank(spec)
    assert fp32 > 0 and memory.weights == 2 * memory.params + 2 * fp32


def test_compressed_layers_store_more_than_sliding_ones(tmp_path):
    spec = load_spec(write(tmp_path), ["train.precision=bf16"])
    per_layer = [dsv4_estimate.attention_activation_elements(spec, i, 2) for i in range(5)]
    sliding, csa, hca = per_layer[0], per_layer[1], per_layer[2]
    assert csa - sliding == pytest.approx(2 * 2 * 16 + 16 / 4 + 5 * 8 / 2)
    assert hca - sliding == pytest.approx(2 * 16 + 16 / 8)
    full = memory_per_rank(load_spec(write(tmp_path), ['train.recompute="full"']))
    assert full.activations < memory_per_rank(spec).activations


def test_an_indexer_loss_keeps_each_local_heads_scores_and_the_losss(tmp_path):
    spec = load_spec(write(tmp_path), ["train.precision=bf16"])
    trained = load_spec(write(tmp_path), ["train.precision=bf16", "model.attention.indexer_loss_weight=1.0"])
    csa = [dsv4_estimate.attention_activation_elements(s, 1, 2) for s in (spec, trained)]
    sliding = [dsv4_estimate.attention_activation_elements(s, 0, 2) for s in (spec, trained)]
    assert sliding[0] == sliding[1]
    assert csa[1] - csa[0] == pytest.approx((3 + 2) * (64 // 4) * 4 / 2)  # (H_I + 2) fp32 scores over s/m entries
    assert memory_per_rank(trained).activations > memory_per_rank(spec).activations
