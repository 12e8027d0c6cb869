"""Spec -> DeepSeek-V4's own blocks in a layer's ModuleSpec: `Dsv4Attention` per [model.attention]
and `Dsv4MoELayer` (sqrt(softplus) top-k or hash router) per [model.moe].

One layer index covers decoder layers and MTP depths (0-based: decoder layers 0..L-1, MTP depth k
at L + k - 1), the order of `model.attention.layer_types`. The per-layer numbers travel in the
ModuleSpec (`Dsv4Attention`'s `settings`, the router class); the settings every layer shares
(SwiGLU clamp, routed scaling, sizes) are TransformerConfig fields set in dsv4cli/build/config.py.
A spec without [model.attention] and with a softmax/sigmoid router leaves the layer spec as it is.
"""

from __future__ import annotations

from dataclasses import replace

from dsv4cli.spec.schema import Spec

SPEC_KIND = {"sliding": "sliding", "csa": "compressed_sparse", "hca": "heavily_compressed"}
"""[model.attention].layer_types entry -> Dsv4AttentionSettings.kind."""


def attention_settings(spec: Spec, index: int):
    """Dsv4AttentionSettings of layer `index` (decoder layers, then MTP depths). Main RoPE theta:
    model.rotary_base; the compressed layers' RoPE: compress_rope_theta with YaRN (factor 1 = off)."""
    from dsv4cli.model.dsv4.attention_settings import Dsv4AttentionSettings, RopeSettings

    m, a = spec.model, spec.model.attention
    compress_rope = RopeSettings(
        theta=a.compress_rope_theta,
        yarn_factor=None if a.yarn_factor == 1.0 else a.yarn_factor,
        original_max_position_embeddings=a.yarn_original_max_position,
        beta_fast=a.yarn_beta_fast,
        beta_slow=a.yarn_beta_slow,
    )
    return Dsv4AttentionSettings(
        kind=SPEC_KIND[a.layer_types[index]],
        compress_ratio=a.ratios()[index],
        q_lora_rank=a.q_lora_rank,
        head_dim=a.head_dim,
        rope_head_dim=a.rope_head_dim,
        o_groups=a.o_groups,
        o_lora_rank=a.o_lora_rank,
        sliding_window=a.sliding_window,
        index_n_heads=a.index_n_heads,
        index_head_dim=a.index_head_dim,
        index_topk=a.index_topk,
        indexer_loss_weight=a.indexer_loss_weight,
        indexer_warmup_steps=a.indexer_warmup_steps,
        main_rope=RopeSettings(theta=m.rotary_base),
        compress_rope=compress_rope,
    )


def uses_dsv4_router(spec: Spec) -> bool:
    """sqrt(softplus) scores (and with them hash routing): DeepSeek-V4's MoE layer."""
    return spec.model.moe is not None and spec.model.moe.score_function == "sqrtsoftplus"


def is_hash_layer(spec: Spec, index: int) -> bool:
    """The first `model.moe.hash_layers` decoder layers route by token id (never an MTP depth)."""
    m = spec.model
    return m.moe is not None and index < min(m.moe.hash_layers, m.num_layers)


def buffer_inventory(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """The saved buffers of the model built from `spec` (DeepSeek-V4's routers): `tid2eid [vocab, top_k]`
    int64 of each hash-routed layer, `expert_bias [num_experts]` fp32 of every other MoE layer (MTP too);
    [(state-dict name, shape)]. Parameters are `dsv4cli.spec.estimate.param_inventory`'s."""
    m = spec.model
    if not uses_dsv4_router(spec):
        return []
    prefixes = [f"decoder.layers.{i}" for i in range(m.num_layers)]
    prefixes += [f"mtp.layers.{k}.transformer_layer" for k in range(m.mtp.depth)]
    return [(f"{p}.mlp.router.tid2eid", (m.vocab_size, m.moe.top_k)) if is_hash_layer(spec, index)
            else (f"{p}.mlp.router.expert_bias", (m.moe.num_experts,)) for index, p in enumerate(prefixes)]


def dsv4_layer_spec(spec: Spec, layer, index: int, norm):
    """A layer's ModuleSpec (megatron's TransformerLayer submodules) -> the same with DeepSeek-V4's
    attention (when [model.attention] is set) and MoE (sqrtsoftplus router) for layer `index`.

    `norm`: the backend's norm class, the input norm in front of DeepSeek-V4 attention (the TE
    spec fuses that norm into linear_qkv, which this attention does not have)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec

    from dsv4cli.model.dsv4.attention import Dsv4Attention
    from dsv4cli.model.dsv4.moe import dsv4_moe_spec

    sub = layer.submodules
    if spec.model.attention is not None:
        keys_map = {k: v for k, v in sub.sharded_state_dict_keys_map.items() if not k.startswith("input_layernorm")}
        sub = replace(
            sub,
            input_layernorm=norm,
            self_attention=ModuleSpec(module=Dsv4Attention, params={"settings": attention_settings(spec, index),
                                                                    "attn_mask_type": AttnMaskType.causal}),
            sharded_state_dict_keys_map=keys_map,
        )
    if uses_dsv4_router(spec):
        sub = replace(sub, mlp=dsv4_moe_spec(sub.mlp, hash_routed=is_hash_layer(spec, index),
                                             vocab_size=spec.model.vocab_size))
    return replace(layer, submodules=sub) if sub is not layer.submodules else layer
