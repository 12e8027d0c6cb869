"""DeepSeek-V4 attention blocks against HF transformers' DeepseekV4 with the same weights (fp32, CPU).

Every HF parameter (including the ones HF initialises to zero or a constant: sinks, position
biases, norm weights) is set to random values and copied into ours through our tensor-name map,
so a parameter we ignore or misplace shows up as a difference. Sequence length 40 gives
compressed entries of every kind, unfinished tail windows for the ratios 3 and 6, a sliding
window (8) shorter than the sequence, and an indexer top-k (3) below the number of entries.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

from dsv4cli.model.dsv4.attention import (
    Dsv4Attention,
    attention_with_sinks,
    sliding_causal_mask,
    tensor_names,
)
from dsv4cli.model.dsv4.attention_settings import Dsv4AttentionSettings, RopeSettings
from dsv4cli.model.dsv4.compressor import COMPRESSOR_TENSOR_NAMES, Dsv4Compressor, compressed_causal_mask
from dsv4cli.model.dsv4.indexer import INDEXER_TENSOR_NAMES, Dsv4Indexer, selected_entries
from dsv4cli.model.dsv4.rope import Rotation

SEQ, BATCH, HIDDEN, HEADS = 40, 2, 64, 4
TOL = 1e-5
HF_KIND = {
    "sliding": "sliding_attention",
    "compressed_sparse": "compressed_sparse_attention",
    "heavily_compressed": "heavily_compressed_attention",
}
KINDS = [
    ("sliding", 0),
    ("compressed_sparse", 4),
    ("heavily_compressed", 16),
    ("compressed_sparse", 3),  # non-standard ratios, with a tail that forms no entry
    ("heavily_compressed", 6),
]


def settings(kind: str = "compressed_sparse", ratio: int = 4) -> Dsv4AttentionSettings:
    return Dsv4AttentionSettings(
        kind=kind,
        compress_ratio=ratio,
        q_lora_rank=24,
        head_dim=32,
        rope_head_dim=8,
        o_groups=2,
        o_lora_rank=16,
        sliding_window=8,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=3,
        main_rope=RopeSettings(theta=10000.0),
        compress_rope=RopeSettings(theta=160000.0, yarn_factor=16.0, original_max_position_embeddings=65536),
    )


def hf_config(s: Dsv4AttentionSettings) -> DeepseekV4Config:
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    if s.compressed:
        rates[HF_KIND[s.kind]] = s.compress_ratio
    config = DeepseekV4Config(
        vocab_size=32,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_hidden_layers=1,
        layer_types=[HF_KIND[s.kind]],
        compress_rates=rates,
        head_dim=s.head_dim,
        qk_rope_head_dim=s.rope_head_dim,
        q_lora_rank=s.q_lora_rank,
        o_groups=s.o_groups,
        o_lora_rank=s.o_lora_rank,
        sliding_window=s.sliding_window,
        index_n_heads=s.index_n_heads,
        index_head_dim=s.index_head_dim,
        index_topk=s.index_topk,
        rope_theta=s.main_rope.theta,
        compress_rope_theta=s.compress_rope.theta,
        rope_parameters={
            "rope_type": "yarn",
            "factor": s.compress_rope.yarn_factor,
            "original_max_position_embeddings": s.compress_rope.original_max_position_embeddings,
            "beta_fast": s.compress_rope.beta_fast,
            "beta_slow": s.compress_rope.beta_slow,
        },
        rms_norm_eps=1e-6,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
    )
    config._attn_implementation = "eager"
    return config


def mcore_config() -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        layernorm_epsilon=1e-6,
        use_cpu_initialization=True,
    )


def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter random: matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.3^2), the rest N(0, 1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * noise)
            elif p.dim() == 2 and not name.endswith("position_bias"):
                p.copy_(noise * p.shape[1] ** -0.5)
            else:
                p.copy_(noise)


def copy_weights(ours: torch.nn.Module, theirs: torch.nn.Module, names: dict[str, tuple[str, str]]) -> None:
    """HF's parameters -> ours through the name map; both sides must be covered exactly."""
    their_params = dict(theirs.named_parameters())
    assert set(dict(ours.named_parameters())) == set(names)
    assert set(their_params) == {hf_name for _, hf_name in names.values()}
    with torch.no_grad():
        for our_name, p in ours.named_parameters():
            src = their_params[names[our_name][1]]
            assert p.shape == src.shape, (our_name, p.shape, src.shape)
            p.copy_(src)


def assert_close(ours, theirs, what: str) -> None:
    assert (ours is None) == (theirs is None), f"{what}: one side has no value"
    if ours is None:
        return
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    diff = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0
    assert diff <= TOL, f"{what}: max abs difference {diff:.3e} > {TOL}"


def assert_grads_close(ours, theirs, names: dict[str, tuple[str, str]]) -> None:
    their_params = dict(theirs.named_parameters())
    for our_name, p in ours.named_parameters():
        assert_close(p.grad, their_params[names[our_name][1]].grad, f"grad of {our_name}")


def inputs(generator: torch.Generator, width: int = HIDDEN) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random activations in megatron's [s, b, *] and HF's [b, s, *] layouts (both leaves)."""
    x = torch.randn(SEQ, BATCH, width, generator=generator)
    return x.clone().requires_grad_(), x.transpose(0, 1).clone().requires_grad_()


def position_ids() -> torch.Tensor:
    return torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)


def backward_both(ours: torch.Tensor, theirs: torch.Tensor, generator: torch.Generator, hf_to_ours) -> None:
    """Back-propagate the same random cotangent through both outputs, scaled as a mean over tokens would be."""
    cotangent = torch.randn(ours.shape, generator=generator) / (SEQ * BATCH)
    (ours * cotangent).sum().backward()
    (hf_to_ours(theirs) * cotangent).sum().backward()


def seq_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1)


@pytest.mark.parametrize("kind,ratio", KINDS)
def test_attention_matches_hf_forward_and_gradients(kind, ratio):
    s = settings(kind, ratio)
    config, gen = hf_config(s), torch.Generator().manual_seed(1)
    theirs = hf.DeepseekV4Attention(config, layer_idx=0)
    randomise(theirs, gen)
    ours = Dsv4Attention(mcore_config(), s)
    names = tensor_names(s)
    copy_weights(ours, theirs, names)
    if s.compressed:
        assert SEQ // ratio > (s.index_topk if kind == "compressed_sparse" else 0), "no real compressed entries"

    x, x_hf = inputs(gen)
    out, bias = ours(x, attention_mask=None)
    assert bias is None
    rotary = hf.DeepseekV4RotaryEmbedding(config)
    pos = position_ids()
    embeddings = {kind: rotary(x_hf, position_ids=pos, layer_type=kind) for kind in ("main", "compress")}
    mask = create_sliding_window_causal_mask(
        config=config, inputs_embeds=x_hf, attention_mask=None, cache=None, position_ids=pos
    )
    assert isinstance(mask, torch.Tensor), "HF's eager path must give a tensor mask (else compressed causality is off)"
    out_hf, _ = theirs(x_hf, position_embeddings=embeddings, position_ids=pos, attention_mask=mask)
    assert_close(out, seq_first(out_hf), f"{kind}/{ratio} output")
    backward_both(out, out_hf, gen, seq_first)
    assert_close(x.grad, seq_first(x_hf.grad), f"{kind}/{ratio} input grad")
    assert_grads_close(ours, theirs, names)
    assert ours.sinks.grad.abs().min() > 0, "every sink must receive a gradient"


@pytest.mark.parametrize("overlap,ratio", [(False, 16), (False, 6), (True, 4), (True, 3)])
def test_compressor_matches_hf_forward_and_gradients(overlap, ratio):
    s = settings("compressed_sparse" if overlap else "heavily_compressed", ratio)
    config, gen = hf_config(s), torch.Generator().manual_seed(2)
    theirs = (hf.DeepseekV4CSACompressor if overlap else hf.DeepseekV4HCACompressor)(config)
    randomise(theirs, gen)
    compressor_only = torch.nn.Module()  # HF's CSA compressor also holds the indexer
    for name, child in theirs.named_children():
        if name != "indexer":
            compressor_only.add_module(name, child)
    compressor_only.position_bias = theirs.position_bias
    ours = Dsv4Compressor(mcore_config(), s.head_dim, ratio, overlap, s.compress_rope, s.rope_head_dim)
    copy_weights(ours, compressor_only, COMPRESSOR_TENSOR_NAMES)

    x, x_hf = inputs(gen)
    q_residual = torch.randn(BATCH, SEQ, s.q_lora_rank, generator=gen)
    entries = ours(x)  # [n, b, d]
    entries_hf, block_bias = theirs(x_hf, q_residual, position_ids(), cache=None, layer_idx=0)
    assert entries.shape[0] == SEQ // ratio
    assert_close(entries, entries_hf[:, 0].transpose(0, 1), f"compressor overlap={overlap} ratio={ratio}")
    if not overlap:  # HF's HCA mask is exactly the causal visibility of complete windows
        visible = compressed_causal_mask(SEQ, SEQ // ratio, ratio)
        assert torch.equal(block_bias[:, 0] == 0, visible.expand(BATCH, -1, -1))
    backward_both(entries, entries_hf, gen, lambda t: t[:, 0].transpose(0, 1))
    assert_close(x.grad, seq_first(x_hf.grad), "compressor input grad")
    assert_grads_close(ours, compressor_only, COMPRESSOR_TENSOR_NAMES)
    assert ours.position_bias.grad.abs().sum() > 0


@pytest.mark.parametrize("ratio", [4, 3])
def test_indexer_matches_hf_choice_scores_and_gradients(ratio):
    s = settings("compressed_sparse", ratio)
    config, gen = hf_config(s), torch.Generator().manual_seed(3)
    theirs = hf.DeepseekV4Indexer(config)
    randomise(theirs, gen)
    ours = Dsv4Indexer(mcore_config(), s)
    copy_weights(ours, theirs, INDEXER_TENSOR_NAMES)

    x, x_hf = inputs(gen)
    q_res, q_res_hf = inputs(gen, s.q_lora_rank)
    captured = []
    theirs.scorer.register_forward_hook(lambda module, args, output: captured.append(output))
    chosen_hf = theirs(x_hf, q_res_hf, position_ids(), cache=None, layer_idx=0)  # [b, s, k]
    result = ours(x, q_res)
    n = SEQ // ratio
    assert result.topk.shape == (SEQ, BATCH, s.index_topk) and n > s.index_topk
    assert torch.equal(result.topk.sort(-1).values, seq_first(chosen_hf).sort(-1).values)
    # a real choice: late queries see more entries than they may read
    assert (result.visible.sum(-1) > s.index_topk).any()
    reads = selected_entries(result.topk, n).sum(-1)  # [s, b]: min(top-k, visible entries) per query
    assert torch.equal(reads, result.visible.sum(-1).clamp(max=s.index_topk)[:, None].expand(-1, BATCH))
    assert_close(result.scores, seq_first(captured[0]), "index scores")
    backward_both(result.scores, captured[0], gen, seq_first)
    assert_close(x.grad, seq_first(x_hf.grad), "indexer hidden grad")
    assert_close(q_res.grad, seq_first(q_res_hf.grad), "indexer q_residual grad")
    assert_grads_close(ours, theirs, INDEXER_TENSOR_NAMES)


def test_attention_with_sinks_matches_hf_eager_attention():
    gen = torch.Generator().manual_seed(4)
    s, b, heads, d, n = 12, 2, 3, 8, 3
    module = torch.nn.Module()
    module.sinks = torch.nn.Parameter(torch.randn(heads, generator=gen))
    module.num_key_value_groups = heads
    q = torch.randn(s, b, heads, d, generator=gen, requires_grad=True)
    kv = torch.randn(s + n, b, d, generator=gen, requires_grad=True)
    allowed = torch.cat([sliding_causal_mask(s, 5), compressed_causal_mask(s, n, 4)], dim=-1)
    sinks = module.sinks.detach().clone().requires_grad_()
    out = attention_with_sinks(q, kv, allowed, sinks, d**-0.5)

    q_hf = q.detach().permute(1, 2, 0, 3).clone().requires_grad_()
    kv_hf = kv.detach().permute(1, 0, 2)[:, None].clone().requires_grad_()
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).expand(b, 1, -1, -1)
    out_hf, _ = hf.eager_attention_forward(module, q_hf, kv_hf, kv_hf, bias, scaling=d**-0.5)  # [b, s, h, d]
    assert_close(out, seq_first(out_hf), "attention with sinks")
    backward_both(out, out_hf, gen, seq_first)
    assert_close(q.grad, q_hf.grad.permute(2, 0, 1, 3), "q grad")
    assert_close(kv.grad, kv_hf.grad[:, 0].transpose(0, 1), "kv grad")
    assert_close(sinks.grad, module.sinks.grad, "sink grad")
    without_sinks = attention_with_sinks(q, kv, allowed, torch.full_like(sinks, -torch.inf), d**-0.5)
    assert (out - without_sinks).abs().max() > 1e-3, "the sinks must change the output"


@pytest.mark.parametrize("layer_type", ["main", "compress"])
def test_rotation_matches_hf_and_inverts(layer_type):
    s = settings()
    config = hf_config(s)
    rope = s.main_rope if layer_type == "main" else s.compress_rope
    pos = torch.arange(SEQ)
    x = torch.randn(SEQ, BATCH, HEADS, s.head_dim, generator=torch.Generator().manual_seed(5))
    cos, sin = hf.DeepseekV4RotaryEmbedding(config)(x, position_ids=pos[None], layer_type=layer_type)
    expected = hf.apply_rotary_pos_emb(x.permute(1, 2, 0, 3), cos, sin).permute(2, 0, 1, 3)
    rotation = Rotation(rope, s.rope_head_dim, pos)
    turned = rotation.rotate(x)
    assert_close(turned, expected, f"{layer_type} rope")
    assert torch.equal(turned[..., : -s.rope_head_dim], x[..., : -s.rope_head_dim])
    assert_close(rotation.rotate(turned, inverse=True), x, "inverse rotation")


@pytest.mark.parametrize("kind", ["compressed_sparse", "heavily_compressed", "sliding"])
def test_tensor_names_map_deepseek_names_to_hf_modules(kind):
    """Our DeepSeek-style names, renamed by HF's own loading rules, land on HF's module names."""
    s = settings(kind, 0 if kind == "sliding" else 4)
    mapping = get_checkpoint_conversion_mapping("deepseek_v4")
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    for ours, (deepseek, hf_name) in tensor_names(s).items():
        renamed, _ = rename_source_key(f"layers.3.attn.{deepseek}", renamings, [])
        assert renamed == f"layers.3.self_attn.{hf_name}", ours


def test_settings_refuse_inconsistent_values():
    with pytest.raises(ValueError, match="compress_ratio must be 0"):
        settings("sliding", 4)
    with pytest.raises(ValueError, match="compress_ratio must be >= 1"):
        settings("heavily_compressed", 0)
    with pytest.raises(ValueError, match="rope_head_dim"):
        Dsv4AttentionSettings(rope_head_dim=7)


def test_attention_replaces_megatrons_self_attention_in_a_transformer_layer(megatron_1proc):
    """Built from a ModuleSpec inside megatron's TransformerLayer and called with its arguments."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from dsv4cli.model.norms import SPNorm

    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        layernorm_epsilon=1e-6,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    attention = ModuleSpec(module=Dsv4Attention, params={"settings": settings("compressed_sparse", 4)})
    submodules = TransformerLayerSubmodules(
        input_layernorm=SPNorm, self_attention=attention, self_attn_bda=get_bias_dropout_add
    )
    layer = build_module(ModuleSpec(module=TransformerLayer, submodules=submodules), config=config, layer_number=1)
    assert isinstance(layer.self_attention, Dsv4Attention)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(6))
    out, _ = layer(hidden_states=x, attention_mask=None)
    expected = x + layer.self_attention.attend(layer.input_layernorm(x))
    assert_close(out, expected, "TransformerLayer with DeepSeek-V4 attention")
    assert (out - x).abs().max() > 1e-3
