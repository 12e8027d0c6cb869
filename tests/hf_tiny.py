"""A tiny HF `DeepseekV4ForCausalLM` with random values in every tensor, for the import-hf and
export-hf tests (transformers is a test-only dependency: import this after `importorskip`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

VOCAB = 64
HF_TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=3,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    head_dim=16, qk_rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8, sliding_window=8,
    index_n_heads=2, index_head_dim=8, index_topk=2, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=16, n_shared_experts=1, hc_mult=2, swiglu_limit=1.0,
    rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                     "beta_fast": 32.0, "beta_slow": 1.0},
)
"""Every attention kind (CSA 4 with top-2 of its entries, HCA 8), a hash-routed layer, 2 mHC streams."""


def randomize(model, seed: int = 0) -> None:
    """Every parameter and buffer HF initialises to zero or a constant gets random values (norm
    weights around 1; sinks, mHC bases/scales, position biases, the expert bias; a random hash table)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif p.dim() >= 2:
                p.copy_(0.15 * noise)
            else:
                p.copy_(0.5 * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif name.endswith("tid2eid"):
                experts = model.config.n_routed_experts
                b.copy_(torch.rand(b.shape[0], experts, generator=g).topk(b.shape[1], dim=-1).indices)


def hf_model(**overrides):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**{**HF_TINY, **overrides})).float().eval()
    randomize(model)
    return model


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def safetensors_dir_tensors(directory) -> dict:
    """{name: tensor} of every tensor in a directory of safetensors shards (HF layout or an export)."""
    from dsv4cli.infer.safetensors_io import stream, tensor_sources

    return {source.name: tensor for source, tensor in stream(tensor_sources(directory).values())}
