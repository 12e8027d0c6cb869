"""DeepSeek-V4 parameter counts per component, from plain sizes and per-layer lists (no torch).

Counts what HF transformers' `DeepseekV4ForCausalLM` holds as parameters, component by
component, so the estimate can be checked against an implementation we did not write.
Buffers (the router's expert bias, the hash-routing table, RoPE tables) are not parameters.

Per decoder layer (h hidden, d head dim, H heads, q the query rank, g/r the output groups/rank,
di/Hi the indexer head dim/heads, m the layer's compression ratio, E experts of width f):

    attention    q_a [q, h] + q_a_norm [q] + q_b [H*d, q] + kv [d, h] + kv_norm [d]
                 + o_a (g blocks of [r, H*d/g]) + o_b [h, g*r]
    sinks        [H]
    compressor   HCA (non-overlapping): kv, gate [d, h] + position bias [m, d] + norm [d]
                 CSA (overlapping):     kv, gate [2d, h] + position bias [m, 2d] + norm [d]
    indexer      CSA only: kv, gate [2di, h] + position bias [m, 2di] + norm [di]
                 + q_b [Hi*di, q] + head weights [Hi, h]
    norms        input and pre-MLP RMSNorm [h] each
    router       gate weight [E, h] (top-k and hash-routed layers alike)
    experts      E x (fc1 [2f, h] + fc2 [h, f]); shared: fc1 [2sf, h] + fc2 [h, sf]
    mHC          per sub-layer: mapping [n*n+2n, n*h] + bias [n*n+2n] + 3 scales (n > 1 only)

Model: embedding [V, h], final norm [h], the learned contraction [n, n*h] + [n] + [1] (n > 1),
output layer [V, h] (none when tied). An MTP depth (DeepSeek's layout, as `dsv4cli.model.mtp`
builds it) adds one decoder layer, enorm/hnorm/final norm [h] each, e_proj and h_proj [h, h]
and its own contraction; it shares the embedding and the output layer.

HF builds its shared expert at width `moe_intermediate_size` whatever `n_shared_experts` says;
here the width is `num_shared_experts * expert_ffn_hidden_size` (equal for the release's 1).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, fields
from typing import Sequence

ATTENTION_KINDS = ("sliding", "csa", "hca")
"""sliding: window only (ratio 0); csa: overlapping compressor + indexer; hca: non-overlapping compressor."""


@dataclass(frozen=True)
class Dsv4Components:
    """Parameter counts by component; `total` is their sum."""

    embedding: int = 0
    attention: int = 0
    sinks: int = 0
    compressors: int = 0
    indexers: int = 0
    norms: int = 0
    router: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    mhc: int = 0
    contraction: int = 0
    mtp_projections: int = 0
    output_layer: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class Dsv4ParamCounts:
    """`main`: the model HF builds (no MTP); `mtp`: all MTP depths together (counted separately)."""

    main: Dsv4Components
    mtp: Dsv4Components

    @property
    def total(self) -> int:
        return self.main.total

    @property
    def total_with_mtp(self) -> int:
        return self.main.total + self.mtp.total


@dataclass(frozen=True)
class Dsv4Sizes:
    """The sizes a DeepSeek-V4 layer's parameters depend on (names as in the module docstring)."""

    hidden_size: int
    num_heads: int
    head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    index_n_heads: int
    index_head_dim: int
    num_experts: int
    expert_ffn_hidden_size: int
    num_shared_experts: int
    hc_mult: int

    def __post_init__(self):
        if (self.num_heads * self.head_dim) % self.o_groups:
            raise ValueError(
                f"num_heads * head_dim ({self.num_heads} * {self.head_dim}) is not a multiple of o_groups ({self.o_groups})"
            )


def _mhc(n: int, h: int) -> int:
    """One sub-layer's mHC mapping: [n*n+2n, n*h] weights, [n*n+2n] bias, 3 scales."""
    width = n * n + 2 * n
    return width * n * h + width + 3 if n > 1 else 0


def _contraction(n: int, h: int) -> int:
    """Learned n -> 1 contraction: [n, n*h] weights, [n] bias, 1 scale."""
    return n * n * h + n + 1 if n > 1 else 0


def attention_shapes(s: Dsv4Sizes, kind: str, ratio: int) -> list[tuple[str, tuple[int, ...], str]]:
    """One layer's attention parameters: [(name under the attention module, shape, component)].

    Names are those of `dsv4cli.model.dsv4` (Dsv4Attention, its compressor and indexer); the
    grouped output projection is one [g*r, H*d/g] weight (HF: g blocks of [r, H*d/g])."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind {kind!r} is not one of {ATTENTION_KINDS}")
    if (kind == "sliding") != (ratio == 0):
        raise ValueError(f"attention kind {kind!r} with compression ratio {ratio}: 0 means sliding only, and only then")
    h, d, heads, q = s.hidden_size, s.head_dim, s.num_heads, s.q_lora_rank
    g, r = s.o_groups, s.o_lora_rank
    out = [
        ("linear_q_down.weight", (q, h), "attention"),
        ("q_norm.weight", (q,), "attention"),
        ("linear_q_up.weight", (heads * d, q), "attention"),
        ("linear_kv.weight", (d, h), "attention"),
        ("kv_norm.weight", (d,), "attention"),
        ("linear_o_down.weight", (g * r, heads * d // g), "attention"),
        ("linear_o_up.weight", (h, g * r), "attention"),
        ("sinks", (heads,), "sinks"),
    ]
    if kind != "sliding":
        out += _compressor_shapes("compressor.", h, d, ratio, 2 if kind == "csa" else 1, "compressors")
    if kind == "csa":
        di, hi = s.index_head_dim, s.index_n_heads
        out += [("indexer.linear_q_up.weight", (hi * di, q), "indexers"),
                ("indexer.linear_weights.weight", (hi, h), "indexers")]
        out += _compressor_shapes("indexer.compressor.", h, di, ratio, 2, "indexers")
    return out


def _compressor_shapes(prefix: str, h: int, d: int, ratio: int, k: int, component: str):
    """A compressor of k series (1: non-overlapping, 2: overlapping) of width d over `ratio` tokens."""
    return [(f"{prefix}linear_kv.weight", (k * d, h), component), (f"{prefix}linear_gate.weight", (k * d, h), component),
            (f"{prefix}position_bias", (ratio, k * d), component), (f"{prefix}norm.weight", (d,), component)]


def layer_params(s: Dsv4Sizes, kind: str, ratio: int) -> Counter:
    """Parameters of one decoder layer by component, for attention `kind` with compression `ratio`."""
    h = s.hidden_size
    c = Counter()
    for _, shape, component in attention_shapes(s, kind, ratio):
        c[component] += math.prod(shape)
    c["norms"] = 2 * h
    c["router"] = s.num_experts * h
    c["routed_experts"] = s.num_experts * 3 * s.expert_ffn_hidden_size * h
    c["shared_experts"] = 3 * s.num_shared_experts * s.expert_ffn_hidden_size * h
    c["mhc"] = 2 * _mhc(s.hc_mult, h)
    return c


def count_dsv4_params(
    sizes: Dsv4Sizes,
    *,
    vocab_size: int,
    attention_kinds: Sequence[str],
    compress_ratios: Sequence[int],
    mtp_depth: int = 0,
    tie_embeddings: bool = False,
    learned_contraction: bool = True,
) -> Dsv4ParamCounts:
    """Counts by component. `attention_kinds` and `compress_ratios` have one entry per decoder
    layer followed by one per MTP depth (DeepSeek's `compress_ratios` layout), so the decoder has
    len(attention_kinds) - mtp_depth layers."""
    if len(attention_kinds) != len(compress_ratios):
        raise ValueError(f"{len(attention_kinds)} attention kinds but {len(compress_ratios)} compression ratios")
    num_layers = len(attention_kinds) - mtp_depth
    if num_layers < 1 or mtp_depth < 0:
        raise ValueError(f"{len(attention_kinds)} per-layer entries do not cover >= 1 decoder layer + {mtp_depth} MTP depths")
    h, n = sizes.hidden_size, sizes.hc_mult
    contraction = _contraction(n, h) if learned_contraction else 0
    main, mtp = Counter(), Counter()
    for i, (kind, ratio) in enumerate(zip(attention_kinds, compress_ratios)):
        (main if i < num_layers else mtp).update(layer_params(sizes, kind, ratio))
    main["embedding"] = vocab_size * h
    main["norms"] += h
    main["contraction"] = contraction
    main["output_layer"] = 0 if tie_embeddings else vocab_size * h
    mtp["norms"] += 3 * h * mtp_depth
    mtp["mtp_projections"] = 2 * h * h * mtp_depth
    mtp["contraction"] = contraction * mtp_depth
    return Dsv4ParamCounts(main=Dsv4Components(**main), mtp=Dsv4Components(**mtp))
