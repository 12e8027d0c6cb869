"""The DeepSeek-V4 parameter count (dsv4cli.spec.dsv4_params) equals HF transformers' model, per component."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf

from dsv4cli.spec.dsv4_params import Dsv4Sizes, count_dsv4_params, layer_params

FLASH_RATIOS = [0, 0, 4] + [128, 4] * 20 + [0]  # 43 layers + the MTP layer
KIND_OF_TYPE = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa", "heavily_compressed_attention": "hca"}

# HF parameter name -> our component (first match wins: more specific parts first)
COMPONENT_OF = (
    ("compressor.indexer.", "indexers"), ("compressor.", "compressors"), ("self_attn.sinks", "sinks"),
    ("self_attn.", "attention"), ("mlp.gate.", "router"), ("mlp.experts.", "routed_experts"),
    ("mlp.shared_experts.", "shared_experts"), ("_hc.", "mhc"), ("hc_head.", "contraction"),
    ("embed_tokens.", "embedding"), ("lm_head.", "output_layer"), ("layernorm.", "norms"), ("model.norm.", "norms"),
)


def sizes_of(config: DeepseekV4Config) -> Dsv4Sizes:
    return Dsv4Sizes(
        hidden_size=config.hidden_size, num_heads=config.num_attention_heads, head_dim=config.head_dim,
        q_lora_rank=config.q_lora_rank, o_groups=config.o_groups, o_lora_rank=config.o_lora_rank,
        index_n_heads=config.index_n_heads, index_head_dim=config.index_head_dim,
        num_experts=config.n_routed_experts, expert_ffn_hidden_size=config.moe_intermediate_size,
        num_shared_experts=config.n_shared_experts, hc_mult=config.hc_mult,
    )


def hf_counts(config: DeepseekV4Config) -> Counter:
    """HF's parameters on the meta device, summed by our component names."""
    with torch.device("meta"):
        model = hf.DeepseekV4ForCausalLM(config)
    counts = Counter()
    for name, p in model.named_parameters():
        component = next((c for part, c in COMPONENT_OF if part in name), None)
        assert component is not None, f"HF parameter {name} matches no component"
        counts[component] += p.numel()
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    return counts


def ours(config: DeepseekV4Config, mtp_ratios=(), mtp_kinds=()):
    sizes = sizes_of(config)
    kinds = [KIND_OF_TYPE[t] for t in config.layer_types] + list(mtp_kinds)
    ratios = [config.compress_rates.get(t, 0) for t in config.layer_types] + list(mtp_ratios)
    return count_dsv4_params(sizes, vocab_size=config.vocab_size, attention_kinds=kinds, compress_ratios=ratios,
                             mtp_depth=len(mtp_kinds), tie_embeddings=config.tie_word_embeddings)


def assert_same_components(counts, theirs: Counter):
    mine = {name: n for name, n in vars(counts.main).items() if n}
    assert mine == dict(theirs), f"ours {mine} != HF {dict(theirs)}"
    assert counts.total == sum(theirs.values())


def test_flash_count_equals_hf_on_meta_device():
    config = DeepseekV4Config(compress_ratios=FLASH_RATIOS)
    assert config.num_hidden_layers == 43 and config.layer_types[2] == "compressed_sparse_attention"
    counts = ours(config, mtp_ratios=[0], mtp_kinds=["sliding"])
    theirs = hf_counts(config)
    assert_same_components(counts, theirs)
    hf_total = sum(theirs.values())
    assert abs(counts.total - hf_total) <= 1e-6 * hf_total
    assert 2.5e11 < counts.total < 3.5e11  # "284B" Flash
    # the MTP depth is counted apart: one sliding layer + e/h projections + 3 norms + contraction
    h, n = config.hidden_size, config.hc_mult
    one_layer = sum(layer_params(sizes_of(config), "sliding", 0).values())
    assert counts.mtp.total == one_layer + 2 * h * h + 3 * h + n * n * h + n + 1
    assert counts.total_with_mtp == counts.total + counts.mtp.total


TINY = dict(
    vocab_size=97, hidden_size=32, num_attention_heads=4, head_dim=16, q_lora_rank=12, o_groups=2, o_lora_rank=10,
    index_n_heads=3, index_head_dim=8, n_routed_experts=5, num_experts_per_tok=2, moe_intermediate_size=14,
    hc_mult=3, num_hidden_layers=4, compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_count_equals_hf_per_component(tied):
    config = DeepseekV4Config(**TINY, tie_word_embeddings=tied)
    counts = ours(config)
    assert_same_components(counts, hf_counts(config))
    assert counts.mtp.total == 0


def test_compression_ratio_and_kind_change_the_count():
    s = sizes_of(DeepseekV4Config(**TINY))
    csa4, csa8, hca8 = (sum(layer_params(s, k, r).values()) for k, r in (("csa", 4), ("csa", 8), ("hca", 8)))
    assert csa8 - csa4 == 4 * 2 * (s.head_dim + s.index_head_dim)  # position biases of compressor + indexer
    assert csa8 > hca8
    with pytest.raises(ValueError, match="0 means sliding"):
        layer_params(s, "hca", 0)
    with pytest.raises(ValueError, match="not one of"):
        layer_params(s, "dense", 0)


def test_counting_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, dsv4cli.spec.dsv4_params; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
