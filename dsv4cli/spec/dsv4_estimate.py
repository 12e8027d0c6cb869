"""Estimates of DeepSeek-V4 attention layers ([model.attention]) from spec fields alone (no torch).

Used by `dsv4cli.spec.estimate` for specs with [model.attention]; docs/estimates.md has the formulas
with their reasoning. Symbols: h hidden, H heads, d head_dim, q q_lora_rank, g/r o_groups/o_lora_rank,
H_I/d_I indexer heads/head dim, K index_topk, W sliding_window, m a layer's compression ratio,
s seq_length. Layer i of `layer_types` (decoder layers, then MTP depths) has kind `layer_types[i]`
and ratio `ratios()[i]`.

Parameters: `attention_inventory` lists one layer's attention parameters with the names of
`dsv4cli.model.dsv4` (the shapes come from `dsv4_params.attention_shapes`, whose counts equal HF's).

FLOPs (forward, per token and layer; training is 3x):
    core      4 * H * d * (keys_window + entries)      QK^T and AV over the keys a query reads
    indexer   2 * H_I * (d_I + 1) * visible            ('csa' only) scoring every visible entry
  averaged over the positions t = 0 .. s-1 of a causal sequence:
    keys_window = mean_t min(t + 1, W)
    visible     = mean_t floor((t + 1) / m)            entries whose window is complete
    entries     = visible ('hca'), mean_t min(K, floor((t + 1) / m)) ('csa'), 0 ('sliding')
  The sink adds one logit per head (element-wise, not counted); projections (also those of the
  compressors and the indexer) are matrix weights and counted with the other weights.

Activation memory: `attention_activation_elements` (per token and layer, see there).
"""

from __future__ import annotations

from dsv4cli.spec.dsv4_params import Dsv4Sizes, attention_shapes
from dsv4cli.spec.schema import Spec

Shape = tuple[int, ...]

FP32_PARAMS = (".sinks", ".position_bias")
"""DeepSeek-V4 attention parameters kept in fp32 (as HF and DeepSeek keep them)."""

TP_REPLICATED = ("self_attention.linear_q_down.", "self_attention.q_norm.", "self_attention.linear_kv.",
                 "self_attention.kv_norm.", ".compressor.")
"""DeepSeek-V4 attention parameters every tensor-parallel rank holds whole (the rest split by head)."""


def is_tp_replicated(name: str) -> bool:
    """A DeepSeek-V4 attention parameter that tensor parallelism does not split (`TP_REPLICATED`)."""
    return ".self_attention." in name and any(part in name for part in TP_REPLICATED)


def sizes(spec: Spec) -> Dsv4Sizes:
    """The spec's DeepSeek-V4 sizes (a dense MLP counts as 0 experts; only attention shapes use this then)."""
    m, a = spec.model, spec.model.attention
    moe = m.moe
    return Dsv4Sizes(
        hidden_size=m.hidden_size, num_heads=m.num_attention_heads, head_dim=a.head_dim, q_lora_rank=a.q_lora_rank,
        o_groups=a.o_groups, o_lora_rank=a.o_lora_rank, index_n_heads=a.index_n_heads,
        index_head_dim=a.index_head_dim, num_experts=moe.num_experts if moe else 0,
        expert_ffn_hidden_size=moe.expert_ffn_hidden_size if moe else 0,
        num_shared_experts=moe.num_shared_experts if moe else 0, hc_mult=m.mhc.streams,
    )


def layer_kind(spec: Spec, index: int) -> tuple[str, int]:
    """(attention kind, compression ratio) of layer `index` (decoder layers, then MTP depths)."""
    a = spec.model.attention
    return a.layer_types[index], a.ratios()[index]


def attention_inventory(spec: Spec, prefix: str, index: int) -> list[tuple[str, Shape]]:
    """Attention parameters of layer `index` under `prefix` (e.g. "decoder.layers.3.self_attention")."""
    kind, ratio = layer_kind(spec, index)
    return [(f"{prefix}.{name}", shape) for name, shape, _ in attention_shapes(sizes(spec), kind, ratio)]


def _floor_sum(n: int, m: int) -> int:
    """sum_{u=1}^{n} floor(u / m) (0 for n <= 0)."""
    if n <= 0:
        return 0
    q, r = divmod(n, m)
    return m * q * (q - 1) // 2 + q * (r + 1)


def key_counts(s: int, window: int, kind: str, ratio: int, topk: int) -> tuple[float, float, float]:
    """(keys_window, entries, visible) averaged over the s positions of a causal sequence (module docstring)."""
    window_sum = s * (s + 1) // 2 if s <= window else window * (window + 1) // 2 + (s - window) * window
    if kind == "sliding":
        return window_sum / s, 0.0, 0.0
    visible = _floor_sum(s, ratio)
    # min(K, floor(u/m)) = floor(u/m) - max(0, floor((u - K*m)/m))
    entries = visible if kind == "hca" else visible - _floor_sum(s - topk * ratio, ratio)
    return window_sum / s, entries / s, visible / s


def attention_forward_flops(spec: Spec, index: int) -> float:
    """Forward FLOPs per token of layer `index`'s attention core and indexer scoring (not its projections)."""
    m, a = spec.model, spec.model.attention
    kind, ratio = layer_kind(spec, index)
    window, entries, visible = key_counts(m.seq_length, a.sliding_window, kind, ratio, a.index_topk)
    flops = 4 * m.num_attention_heads * a.head_dim * (window + entries)
    if kind == "csa":
        flops += 2 * a.index_n_heads * (a.index_head_dim + 1) * visible
    return flops


def attention_flops_per_token(spec: Spec) -> float:
    """Training FLOPs per token of every layer's attention core and indexer: 3 x forward, all layers + MTP."""
    layers = spec.model.num_layers + spec.model.mtp.depth
    return 3 * sum(attention_forward_flops(spec, i) for i in range(layers))


def attention_activation_elements(spec: Spec, index: int, act_bytes: int) -> float:
    """Elements (in the activation dtype) one token stores for backward in layer `index`'s attention, per rank.

        input h; query q (q_a output) + q (normed) + H*d (q_b output) + H*d (normed, rotated);
        key/value d + d (normed, rotated); output H*d (attention) + H*d (inverse-rotated) + g*r (o_a);
        compressed layers: the compressor's kv and gate outputs 2 * k*d (k = 2 overlapping, 1 not)
        and one pooled entry of d per m tokens; 'csa': the indexer's top-k entry ids (int64), and
        with an indexer loss (indexer_loss_weight > 0) (H_I/tp + 2) fp32 scores over all s/m
        entries: one per local indexer head (its ReLU output) and two of the loss (its log-softmax
        and target).
    Attention itself is counted as a fused kernel keeps it (no [s, keys] scores; the sink's
    softmax statistics are H floats). Without an indexer loss the indexer runs without gradient
    and keeps nothing; its heads' sum is a chain across the TP ranks holding one [s, b, s/m] fp32
    partial at a time (transient, not counted).
    Tensor parallelism tp divides the per-head terms (H*d, g*r, the statistics, the indexer's
    heads); the input (whole sequence, gathered under sequence parallelism), the query residual,
    the key/value, the compressors, the top-k ids and the indexer loss's tensors are replicated.
    """
    m, a = spec.model, spec.model.attention
    kind, ratio = layer_kind(spec, index)
    h, heads, d = m.hidden_size, m.num_attention_heads / spec.parallel.tp, a.head_dim
    groups = a.o_groups / spec.parallel.tp
    out = h + 2 * a.q_lora_rank + 4 * heads * d + 2 * d + groups * a.o_lora_rank + heads * 4 / act_bytes
    if kind != "sliding":
        out += 2 * (2 if kind == "csa" else 1) * d + d / ratio
    if kind == "csa":
        out += a.index_topk * 8 / act_bytes
        if a.indexer_loss_weight > 0:
            out += (a.index_n_heads / spec.parallel.tp + 2) * (m.seq_length // ratio) * 4 / act_bytes
    return out
