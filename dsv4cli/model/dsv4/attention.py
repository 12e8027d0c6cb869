"""DeepSeek-V4 attention of one layer, plain PyTorch (the reference path), in megatron's [s, b, h] layout.

    x [s, b, h] -> linear_q_down -> q_norm = q_res [s, b, q_lora] -> linear_q_up -> [s, b, H, D]
                -> per-head RMS (no weight) -> RoPE                        = q
    x           -> linear_kv -> kv_norm -> RoPE                            = kv [s, b, D]  (one head: K and V)
    compressed layers: compressor(x) -> c [n, b, D], appended to the keys/values
    scores = q . [kv ; c] * D^-1/2, allowed keys:
        the local kv within the sliding window (0 <= t - j < window),
        heavily compressed: every complete entry (w < (t + 1) // ratio),
        compressed sparse: the indexer's top-k of those entries (all of them during the dense
        warm-up; the indexer's KL loss against the dense attention: indexer_loss.py)
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
from dsv4cli.model.dsv4.indexer_loss import IndexerLossAutoScaler, indexer_kl
from dsv4cli.model.dsv4.norm import RMSNorm, rms_normalize
from dsv4cli.model.dsv4.rope import Rotation
from dsv4cli.model.dsv4.tp_split import (
    TpShardedState,
    combine_output,
    copy_to,
    full_sequence,
    gather_heads,
    split_linear,
    split_parameter,
    tp_group,
)
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


def attention_probs(q: Tensor, kv: Tensor, allowed: Tensor, sinks: Tensor, scale: float) -> Tensor:
    """softmax([q.k * scale, sink]) minus the sink column, fp32 (the sinks are fp32).

    q [s, b, H, D], kv [m, b, D], allowed [s, m] or [s, b, m] bool, sinks [H] -> [b, H, s, m]."""
    logits = (torch.einsum("sbhd,mbd->bhsm", q, kv) * scale).float()
    mask = allowed[None, None] if allowed.dim() == 2 else allowed.permute(1, 0, 2)[:, None]
    logits = logits.masked_fill(~mask, float("-inf"))
    b, heads, s, _ = logits.shape
    sink = sinks.float().view(1, heads, 1, 1).expand(b, heads, s, 1)
    return torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]


def attention_with_sinks(q: Tensor, kv: Tensor, allowed: Tensor, sinks: Tensor, scale: float) -> Tensor:
    """`attention_probs` times v; K and V are the same tensor.

    q [s, b, H, D], kv [m, b, D], allowed [s, m] or [s, b, m] bool, sinks [H] -> [s, b, H, D]."""
    return weighted_values(attention_probs(q, kv, allowed, sinks, scale), kv)


def weighted_values(probs: Tensor, kv: Tensor) -> Tensor:
    """probs [b, H, s, m], kv [m, b, D] -> [s, b, H, D]."""
    return torch.einsum("bhsm,mbd->sbhd", probs.to(kv.dtype), kv)


def grouped_projection(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """Block-diagonal linear: x [..., G * i] with weight [G * r, i] -> [..., G * r] (group g uses rows g*r..)."""
    w = weight.view(groups, -1, weight.shape[-1])  # [G, r, i]
    y = torch.einsum("...gi,gri->...gr", x.reshape(*x.shape[:-1], groups, -1), w)
    return y.flatten(-2)


class Dsv4Attention(TpShardedState, KeepFp32Params, MegatronModule):
    """DeepSeek-V4 self-attention with megatron's `SelfAttention.forward` contract: [s, b, h] -> ([s, b, h], None)
    ([s / T, b, h] in and out under sequence parallelism).

    Tensor parallelism T: this rank holds H / T heads, o_groups / T output groups and H_I / T indexer
    heads (tp_split.py says what is split and what is replicated). The sinks stay fp32 through
    `.bfloat16()` (like the norm weights and position biases below it)."""

    TP_AXES = {"linear_q_up.weight": 0, "linear_o_down.weight": 0, "linear_o_up.weight": 1, "sinks": 0}

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
        self.tp = tp = tp_group(config, pg_collection)
        self.local_heads = tp.split(self.n_heads, "num_attention_heads")
        self.local_groups = tp.split(settings.o_groups, "o_groups")
        eps, device = config.layernorm_epsilon, param_device(config)
        self.linear_q_down = comp.linear_weight(config, settings.q_lora_rank, config.hidden_size)
        self.q_norm = RMSNorm(settings.q_lora_rank, eps, device=device)
        self.linear_q_up = split_linear(config, self.n_heads * self.head_dim, settings.q_lora_rank, tp, 0)
        self.linear_kv = comp.linear_weight(config, self.head_dim, config.hidden_size)
        self.kv_norm = RMSNorm(self.head_dim, eps, device=device)
        self.linear_o_down = split_linear(
            config, settings.o_groups * settings.o_lora_rank, self.n_heads * self.head_dim // settings.o_groups, tp, 0
        )
        self.linear_o_up = split_linear(
            config, config.hidden_size, settings.o_groups * settings.o_lora_rank, tp, 1,
            init=config.output_layer_init_method,
        )
        self.sinks = split_parameter(torch.zeros(self.n_heads, dtype=torch.float32, device=device), tp)
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
            self.indexer = Dsv4Indexer(config, settings, tp)
        self.iteration: Optional[int] = None  # set by the training loop (indexer_loss.set_iteration)
        self.indexer_loss_sum, self.indexer_loss_count = 0.0, 0  # this step's losses (logging)

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
        """[s, b, h] -> [s, b, h] (the math of the module docstring; [s / T, b, h] under sequence parallelism)."""
        x = full_sequence(x, self.tp)
        s, b, _ = x.shape
        cfg = self.settings
        eps = self.config.layernorm_epsilon
        rotation = Rotation(cfg.rope, cfg.rope_head_dim, torch.arange(s, device=x.device))
        q_residual = self.q_norm(self.linear_q_down(x))  # [s, b, q_lora]
        q = self.linear_q_up(copy_to(q_residual, self.tp)).view(s, b, self.local_heads, self.head_dim)
        q = rotation.rotate(rms_normalize(q, eps))
        kv = rotation.rotate(self.kv_norm(self.linear_kv(x)))  # [s, b, D]
        allowed = sliding_causal_mask(s, cfg.sliding_window, device=x.device)  # [s, s]
        if self.compressor is not None:
            kv = torch.cat([kv, self.compressor(x)], dim=0)  # [s + n, b, D]: tokens, then compressed entries
        kv = copy_to(kv, self.tp)  # replicated, read by this rank's heads
        if self.indexer is not None:
            out = self.attend_sparse(x, q_residual, q, kv, allowed)
        else:
            if self.compressor is not None:
                visible = comp.compressed_causal_mask(s, kv.shape[0] - s, cfg.compress_ratio, x.device)
                allowed = torch.cat([allowed, visible], dim=-1)
            out = attention_with_sinks(q, kv, allowed, self.sinks, self.head_dim**-0.5)
        out = rotation.rotate(out, inverse=True).reshape(s, b, self.local_heads * self.head_dim)
        out = self.linear_o_up(grouped_projection(out, self.linear_o_down.weight, self.local_groups))
        return combine_output(out, self.tp)  # the sum over all ranks' output groups

    def dense_now(self) -> bool:
        """True during the dense warm-up: the iteration the training loop set is below the warm-up."""
        return self.iteration is not None and self.iteration < self.settings.indexer_warmup_steps

    def attend_sparse(self, x: Tensor, q_residual: Tensor, q: Tensor, kv_all: Tensor, window: Tensor) -> Tensor:
        """Compressed sparse attention: x [s, b, h], q_residual [s, b, q_lora], q [s, b, H, D],
        kv_all [s + n, b, D] (tokens, then compressed entries), window [s, s] -> [s, b, H, D].

        Keys: the window plus the indexer's top-k entries (every visible entry during the dense
        warm-up). With an indexer loss (training, grad enabled) the KL of `indexer_loss` is attached."""
        s, b = q.shape[:2]
        n = kv_all.shape[0] - s
        weight = self.settings.indexer_loss_weight
        with_loss = weight > 0 and self.training and torch.is_grad_enabled()
        scale = self.head_dim**-0.5
        if with_loss:  # the loss trains the indexer alone
            x, q_residual = x.detach(), q_residual.detach()
        dense = self.dense_now()
        index = None  # dense, no loss: unused
        if with_loss or not dense:
            with torch.set_grad_enabled(with_loss):  # without a loss the scores only feed the top-k choice
                index = self.indexer(x, q_residual)
        ratio = self.settings.compress_ratio
        visible = index.visible if index is not None else comp.compressed_causal_mask(s, n, ratio, x.device)
        window = window[:, None, :].expand(s, b, s)
        every_visible = torch.cat([window, visible[:, None, :].expand(s, b, n)], dim=-1)
        allowed = every_visible if dense else torch.cat([window, selected_entries(index.topk, n)], dim=-1)
        probs = attention_probs(q, kv_all, allowed, self.sinks, scale)  # [b, H, s, s + n]
        out = weighted_values(probs, kv_all)
        if not with_loss:
            return out
        with torch.no_grad():  # the target is the dense attention, whatever this step attends to
            if not dense:
                probs = attention_probs(q, kv_all, every_visible, self.sinks, scale)
            # this rank's heads summed, then the ranks' sums in rank order: [b, T, s, n]
            entry_probs = gather_heads(probs[..., s:].sum(dim=1)[None], self.tp).movedim(0, 1)
        loss = indexer_kl(index.scores, entry_probs, index.visible)
        self.indexer_loss_sum = self.indexer_loss_sum + loss.detach()
        self.indexer_loss_count += 1
        return IndexerLossAutoScaler.apply(out, loss * weight)
