"""DeepSeek-V4 attention of one layer, plain PyTorch (the reference path), in megatron's [s, b, h] layout.

    x [s, b, h] -> linear_q_down -> q_norm = q_res [s, b, q_lora] -> linear_q_up -> [s, b, H, D]
                -> per-head RMS (no weight) -> RoPE                        = q
    x           -> linear_kv -> kv_norm -> RoPE                            = kv [s, b, D]  (one head: K and V)
    compressed layers: compressor(x) -> c [n, b, D], appended to the keys/values
    scores = q . [kv ; c] * D^-1/2, allowed keys:
        the local kv within the sliding window (0 <= t - j < window),
        heavily compressed: every complete entry (w < (t + 1) // ratio),
        compressed sparse: the indexer's top-k of those entries
    softmax over [scores, sink_h] (one learned fp32 logit per head absorbs probability), sink dropped
    o [s, b, H, D] -> inverse RoPE on its rope slice (V carried K's rotation)
      -> heads split into o_groups groups, each [H*D/G] -> o_lora_rank (linear_o_down, block-diagonal)
      -> [s, b, G * o_lora_rank] -> linear_o_up -> [s, b, h]

RoPE: the main setting on sliding-window layers, the compress setting (YaRN) on compressed layers.
Positions are 0..s-1 (one sequence per sample; no padding mask, no packed sequences, no KV cache).
No attention dropout (DeepSeek-V4 has none): `config.attention_dropout` is not used.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from dsv4cli.model.dsv4 import compressor as comp
from dsv4cli.model.dsv4.attention_settings import Dsv4AttentionSettings
from dsv4cli.model.dsv4.indexer import INDEXER_TENSOR_NAMES, Dsv4Indexer, selected_entries
from dsv4cli.model.dsv4.norm import RMSNorm, rms_normalize
from dsv4cli.model.dsv4.rope import Rotation
from dsv4cli.model.fp32_params import KeepFp32Params
from dsv4cli.model.hyper_connection import param_device

# ours -> (DeepSeek's / the safetensors file's name under `layers.N.attn.`, HF's module name under
# `layers.N.self_attn.`); the compressor and indexer entries apply to compressed / sparse layers only.
ATTENTION_TENSOR_NAMES = {
    "linear_q_down.weight": ("wq_a.weight", "q_a_proj.weight"),
    "q_norm.weight": ("q_norm.weight", "q_a_norm.weight"),
    "linear_q_up.weight": ("wq_b.weight", "q_b_proj.weight"),
    "linear_kv.weight": ("wkv.weight", "kv_proj.weight"),
    "kv_norm.weight": ("norm.weight", "kv_norm.weight"),
    "linear_o_down.weight": ("wo_a.weight", "o_a_proj.weight"),
    "linear_o_up.weight": ("wo_b.weight", "o_b_proj.weight"),
    "sinks": ("attn_sink", "sinks"),
}
COMPRESSED_TENSOR_NAMES = comp.prefix_names(comp.COMPRESSOR_TENSOR_NAMES, "compressor.", "compressor.", "compressor.")
SPARSE_TENSOR_NAMES = comp.prefix_names(INDEXER_TENSOR_NAMES, "indexer.", "indexer.", "compressor.indexer.")


def tensor_names(settings: Dsv4AttentionSettings) -> dict[str, tuple[str, str]]:
    """Every parameter of a `Dsv4Attention` with these settings -> (DeepSeek name, HF module name)."""
    names = dict(ATTENTION_TENSOR_NAMES)
    if settings.compressed:
        names.update(COMPRESSED_TENSOR_NAMES)
    if settings.kind == "compressed_sparse":
        names.update(SPARSE_TENSOR_NAMES)
    return names


def sliding_causal_mask(seq_len: int, window: int, device=None) -> Tensor:
    """[s, s] bool: query t sees key j when 0 <= t - j < window."""
    distance = torch.arange(seq_len, device=device)[:, None] - torch.arange(seq_len, device=device)[None, :]
    return (distance >= 0) & (distance < window)


def attention_with_sinks(q: Tensor, kv: Tensor, allowed: Tensor, sinks: Tensor, scale: float) -> Tensor:
    """softmax([q.k * scale, sink]) minus the sink column, times v; K and V are the same tensor.

    q [s, b, H, D], kv [m, b, D], allowed [s, m] or [s, b, m] bool, sinks [H] -> [s, b, H, D]."""
    logits = (torch.einsum("sbhd,mbd->bhsm", q, kv) * scale).float()  # softmax with the fp32 sinks in fp32
    mask = allowed[None, None] if allowed.dim() == 2 else allowed.permute(1, 0, 2)[:, None]
    logits = logits.masked_fill(~mask, float("-inf"))
    b, heads, s, _ = logits.shape
    sink = sinks.float().view(1, heads, 1, 1).expand(b, heads, s, 1)
    probs = torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]
    return torch.einsum("bhsm,mbd->sbhd", probs.to(kv.dtype), kv)


def grouped_projection(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """Block-diagonal linear: x [..., G * i] with weight [G * r, i] -> [..., G * r] (group g uses rows g*r..)."""
    w = weight.view(groups, -1, weight.shape[-1])  # [G, r, i]
    y = torch.einsum("...gi,gri->...gr", x.reshape(*x.shape[:-1], groups, -1), w)
    return y.flatten(-2)


class Dsv4Attention(KeepFp32Params, MegatronModule):
    """DeepSeek-V4 self-attention with megatron's `SelfAttention.forward` contract: [s, b, h] -> ([s, b, h], None).

    The sinks stay fp32 through `.bfloat16()` (like the norm weights and position biases below it)."""

    def fp32_param_names(self) -> list[str]:
        return ["sinks"]

    def __init__(
        self,
        config: TransformerConfig,
        settings: Dsv4AttentionSettings,
        layer_number: int = 1,
        pg_collection=None,
        cp_comm_type: Optional[str] = None,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        name: Optional[str] = None,  # megatron-core 0.19 passes each module its instance name
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:  # megatron's MTP layer reads it from the spec's params
            raise ValueError(f"DeepSeek-V4 attention is causal; got attn_mask_type {attn_mask_type}")
        self.attn_mask_type = attn_mask_type
        if config.context_parallel_size != 1:
            raise ValueError("DeepSeek-V4 attention does not support context parallelism yet")
        self.settings, self.layer_number = settings, layer_number
        self.n_heads, self.head_dim = config.num_attention_heads, settings.head_dim
        if (self.n_heads * self.head_dim) % settings.o_groups:
            raise ValueError(
                f"o_groups ({settings.o_groups}) must divide num_attention_heads * head_dim "
                f"({self.n_heads} * {self.head_dim})"
            )
        eps, device = config.layernorm_epsilon, param_device(config)
        self.linear_q_down = comp.linear_weight(config, settings.q_lora_rank, config.hidden_size)
        self.q_norm = RMSNorm(settings.q_lora_rank, eps, device=device)
        self.linear_q_up = comp.linear_weight(config, self.n_heads * self.head_dim, settings.q_lora_rank)
        self.linear_kv = comp.linear_weight(config, self.head_dim, config.hidden_size)
        self.kv_norm = RMSNorm(self.head_dim, eps, device=device)
        self.linear_o_down = comp.linear_weight(
            config, settings.o_groups * settings.o_lora_rank, self.n_heads * self.head_dim // settings.o_groups
        )
        self.linear_o_up = comp.linear_weight(
            config, config.hidden_size, settings.o_groups * settings.o_lora_rank, init=config.output_layer_init_method
        )
        self.sinks = torch.nn.Parameter(torch.zeros(self.n_heads, dtype=torch.float32, device=device))
        self.compressor = None
        self.indexer = None
        if settings.compressed:
            self.compressor = comp.Dsv4Compressor(
                config,
                self.head_dim,
                settings.compress_ratio,
                overlap=settings.kind == "compressed_sparse",
                rope=settings.compress_rope,
                rope_dim=settings.rope_head_dim,
            )
        if settings.kind == "compressed_sparse":
            self.indexer = Dsv4Indexer(config, settings)

    # megatron's SelfAttention.forward keywords; those with a value here are refused, the rest unused
    MEGATRON_KWARGS = ("key_value_states", "inference_context", "rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin",
                       "rotary_pos_cos_sin", "attention_bias", "packed_seq_params", "sequence_len_offset",
                       "inference_params")
    REFUSED = ("key_value_states", "inference_context", "inference_params", "packed_seq_params", "attention_bias")

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, **megatron_kwargs
                ) -> tuple[Tensor, None]:
        """hidden_states [s, b, h] -> ([s, b, h], None); called as megatron calls SelfAttention.

        `attention_mask` and the rotary arguments megatron passes are not used: causality, the
        sliding window and the compressed entries' visibility follow from positions 0..s-1, and the
        layer applies its own RoPE. Cross attention, KV caches, packed sequences and attention
        biases are refused."""
        unknown = sorted(set(megatron_kwargs) - set(self.MEGATRON_KWARGS))
        if unknown:
            raise TypeError(f"Dsv4Attention.forward got unexpected arguments {unknown}")
        given = [name for name in self.REFUSED if megatron_kwargs.get(name) is not None]
        if given:
            raise NotImplementedError(f"DeepSeek-V4 attention does not take {', '.join(given)} yet")
        return self.attend(hidden_states), None

    def attend(self, x: Tensor) -> Tensor:
        """[s, b, h] -> [s, b, h] (the math of the module docstring)."""
        s, b, _ = x.shape
        cfg = self.settings
        eps = self.config.layernorm_epsilon
        rotation = Rotation(cfg.rope, cfg.rope_head_dim, torch.arange(s, device=x.device))
        q_residual = self.q_norm(self.linear_q_down(x))  # [s, b, q_lora]
        q = self.linear_q_up(q_residual).view(s, b, self.n_heads, self.head_dim)
        q = rotation.rotate(rms_normalize(q, eps))
        kv = rotation.rotate(self.kv_norm(self.linear_kv(x)))  # [s, b, D]
        allowed = sliding_causal_mask(s, cfg.sliding_window, device=x.device)  # [s, s]
        if self.compressor is not None:
            entries = self.compressor(x)  # [n, b, D]
            n = entries.shape[0]
            if self.indexer is not None:
                visible = selected_entries(self.indexer(x, q_residual).topk, n)  # [s, b, n]
                allowed = torch.cat([allowed[:, None, :].expand(s, b, s), visible], dim=-1)
            else:
                allowed = torch.cat([allowed, comp.compressed_causal_mask(s, n, cfg.compress_ratio, x.device)], dim=-1)
            kv_all = torch.cat([kv, entries], dim=0)
        else:
            kv_all = kv
        out = attention_with_sinks(q, kv_all, allowed, self.sinks, self.head_dim**-0.5)
        out = rotation.rotate(out, inverse=True).reshape(s, b, self.n_heads * self.head_dim)
        return self.linear_o_up(grouped_projection(out, self.linear_o_down.weight, cfg.o_groups))
