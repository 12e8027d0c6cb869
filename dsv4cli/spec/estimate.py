"""Estimates from a spec alone (no torch): parameter inventory and counts, FLOPs/token, memory per rank.

`param_inventory(spec)` is THE list of parameters the built model has — state-dict names
(Megatron-Core local-module naming, unstacked layers) and shapes — so the builder, `dsv4
inspect model` and checkpoint conformance can compare against one source. Routed experts
are named like Megatron-Core's SequentialMLP: `mlp.experts.local_experts.{e}.linear_fc1.weight`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from dsv4cli.spec import dsv4_estimate
from dsv4cli.spec.layout import ParallelDims, layer_pipeline_ranks
from dsv4cli.spec.schema import Spec

Shape = tuple[int, ...]
GiB = 1024**3
EXPERT = "{e}"
"""Placeholder for the expert index in the compact inventory."""


# ---------------------------------------------------------------------------------------------
# parameter inventory
# ---------------------------------------------------------------------------------------------
def padded_vocab_size(spec: Spec) -> int:
    """ceil(vocab_size / (vocab_pad_multiple*tp)) * vocab_pad_multiple*tp."""
    multiple = spec.model.vocab_pad_multiple * spec.parallel.tp
    return math.ceil(spec.model.vocab_size / multiple) * multiple


def kv_channels(spec: Spec) -> int:
    """Head dim: model.kv_channels, else hidden_size // num_attention_heads."""
    return spec.model.kv_channels or spec.model.hidden_size // spec.model.num_attention_heads


def _hyper_connection(prefix: str, n: int, h: int) -> list[tuple[str, Shape]]:
    """mHC parameters of one sub-layer: W [n*n+2n, n*h], alpha_{pre,post,res} [1], bias [n*n+2n]."""
    width = n * n + 2 * n
    return [
        (f"{prefix}.mapping_proj.weight", (width, n * h)),
        (f"{prefix}.alpha_pre", (1,)),
        (f"{prefix}.alpha_post", (1,)),
        (f"{prefix}.alpha_res", (1,)),
        (f"{prefix}.bias", (width,)),
    ]


def _contraction(prefix: str, n: int, h: int) -> list[tuple[str, Shape]]:
    """Learned contraction: hc_head_fn [n, n*h], hc_head_base [n], hc_head_scale [1]."""
    return [(f"{prefix}hc_head_fn", (n, n * h)), (f"{prefix}hc_head_base", (n,)), (f"{prefix}hc_head_scale", (1,))]


def layer_inventory(spec: Spec, prefix: str, index: int) -> list[tuple[str, Shape]]:
    """Layer `index` (decoder layers, then MTP depths: attention + dense or MoE MLP + mHC when
    streams > 1) under `prefix.`. With [model.attention] the attention is DeepSeek-V4's, of the
    layer's kind (`dsv4cli.spec.dsv4_estimate`); else megatron's (fused QKV, output projection).

    Routed experts appear once per weight with EXPERT ("{e}") in the name; `param_inventory`
    expands them to num_experts entries (the estimates count them without expanding).
    """
    m = spec.model
    h, heads, n = m.hidden_size, m.num_attention_heads, m.mhc.streams
    g, kv = m.num_query_groups or heads, kv_channels(spec)
    out: list[tuple[str, Shape]] = [(f"{prefix}.input_layernorm.weight", (h,))]
    if m.attention is not None:
        out += dsv4_estimate.attention_inventory(spec, f"{prefix}.self_attention", index)
    else:
        out += [
            (f"{prefix}.self_attention.linear_qkv.weight", ((heads + 2 * g) * kv, h)),
            (f"{prefix}.self_attention.linear_proj.weight", (h, heads * kv)),
        ]
    out.append((f"{prefix}.pre_mlp_layernorm.weight", (h,)))
    if m.moe is None:
        out += [
            (f"{prefix}.mlp.linear_fc1.weight", (2 * m.ffn_hidden_size, h)),
            (f"{prefix}.mlp.linear_fc2.weight", (h, m.ffn_hidden_size)),
        ]
    else:
        e, eff, s = m.moe.num_experts, m.moe.expert_ffn_hidden_size, m.moe.num_shared_experts
        out.append((f"{prefix}.mlp.router.weight", (e, h)))
        out += [
            (f"{prefix}.mlp.experts.local_experts.{EXPERT}.linear_fc1.weight", (2 * eff, h)),
            (f"{prefix}.mlp.experts.local_experts.{EXPERT}.linear_fc2.weight", (h, eff)),
        ]
        if s > 0:
            out += [
                (f"{prefix}.mlp.shared_experts.linear_fc1.weight", (2 * s * eff, h)),
                (f"{prefix}.mlp.shared_experts.linear_fc2.weight", (h, s * eff)),
            ]
    if n > 1:
        out += _hyper_connection(f"{prefix}.self_attention_hyper_connection", n, h)
        out += _hyper_connection(f"{prefix}.mlp_hyper_connection", n, h)
    return out


def param_inventory(spec: Spec) -> list[tuple[str, Shape]]:
    """Every parameter of the model built from `spec`: [(state-dict name, shape)], model order."""
    experts = spec.model.moe.num_experts if spec.model.moe else 0
    out: list[tuple[str, Shape]] = []
    for name, shape in compact_inventory(spec):
        if EXPERT in name:
            out += [(name.replace(EXPERT, str(i)), shape) for i in range(experts)]
        else:
            out.append((name, shape))
    return out


def _copies(spec: Spec, name: str) -> int:
    """How many parameters one compact-inventory entry stands for."""
    return spec.model.moe.num_experts if (EXPERT in name and spec.model.moe) else 1


def compact_inventory(spec: Spec) -> list[tuple[str, Shape]]:
    """`param_inventory` with each routed-expert weight listed once (name holds EXPERT)."""
    m = spec.model
    h, n, vocab = m.hidden_size, m.mhc.streams, padded_vocab_size(spec)
    learned = n > 1 and m.contraction.mode == "learned"
    out: list[tuple[str, Shape]] = [("embedding.word_embeddings.weight", (vocab, h))]
    for i in range(m.num_layers):
        out += layer_inventory(spec, f"decoder.layers.{i}", i)
    out.append(("decoder.final_layernorm.weight", (h,)))
    if learned:
        out += _contraction("decoder.", n, h)
    for k in range(m.mtp.depth):
        p = f"mtp.layers.{k}"
        out += [(f"{p}.enorm.weight", (h,)), (f"{p}.hnorm.weight", (h,))]
        if n > 1:
            out += [(f"{p}.e_proj.weight", (h, h)), (f"{p}.h_proj.weight", (h, h))]
        else:
            out.append((f"{p}.eh_proj.weight", (h, 2 * h)))
        out += layer_inventory(spec, f"{p}.transformer_layer", m.num_layers + k)
        out.append((f"{p}.final_layernorm.weight", (h,)))
        if learned:
            out += _contraction(f"{p}.", n, h)
    if not m.tie_embeddings:
        out.append(("output_layer.weight", (vocab, h)))
    return out


def numel(shape: Shape) -> int:
    return math.prod(shape)


def is_mhc(name: str) -> bool:
    return "_hyper_connection." in name


def is_contraction(name: str) -> bool:
    return ".hc_head_" in name or name.startswith("hc_head_")


def is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts. `mhc`, `contraction`, `mtp`, `embedding` and `routed_experts` are parts of
    `total` that may overlap (MTP layers carry mHC and contraction parameters too).

    With [model.attention] (DeepSeek-V4) `total` is the main model without MTP, the number HF's
    `DeepseekV4ForCausalLM` has (it builds no MTP), and `mtp` is counted apart (not in `total`,
    `active` or the other parts)."""

    total: int
    active: int
    embedding: int
    mhc: int
    contraction: int
    mtp: int
    routed_experts: int


def param_counts(spec: Spec) -> ParamCounts:
    """Sum of `param_inventory`; active = total minus the routed experts a token does not use."""
    inv = [(name, numel(shape) * _copies(spec, name)) for name, shape in compact_inventory(spec)]
    mtp = sum(c for name, c in inv if name.startswith("mtp."))
    if spec.model.attention is not None:
        inv = [(name, c) for name, c in inv if not name.startswith("mtp.")]
    routed = sum(c for name, c in inv if is_routed_expert(name))
    total = sum(c for _, c in inv)
    moe = spec.model.moe
    active = total - (routed - routed * moe.top_k // moe.num_experts if moe else 0)
    return ParamCounts(
        total=total,
        active=active,
        embedding=sum(c for name, c in inv if name.startswith(("embedding.", "output_layer."))),
        mhc=sum(c for name, c in inv if is_mhc(name)),
        contraction=sum(c for name, c in inv if is_contraction(name)),
        mtp=mtp,
        routed_experts=routed,
    )


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def flops_per_token(spec: Spec) -> int:
    """Training FLOPs per token (forward + backward = 3 x forward):

        6 * W_active + 6 * (L + D) * s * heads * kv

    W_active: elements of the matrices a token multiplies with — every 2-D weight except the
    input embedding (a lookup), routed experts scaled by top_k / num_experts, mHC mapping and
    contraction projections included, and the output layer counted 1 + D times (the main head
    and each MTP depth share it; also when tied). The second term is causal attention
    (QK^T and AV, 2 * 2 * s * heads * kv per token and layer, halved by the causal mask)
    over L decoder layers and D MTP layers. Element-wise work (norms, Sinkhorn, softmax) is ignored.
    With [model.attention] the second term is DeepSeek-V4's: each query reads its sliding window
    and its compressed entries (every complete one, or the indexer's top-k), and the indexer scores
    every complete entry (`dsv4_estimate.attention_flops_per_token`); the compressors' position
    biases are added, not multiplied (not in W_active).
    """
    m = spec.model
    moe = m.moe
    w = 0.0
    for name, shape in compact_inventory(spec):
        if len(shape) != 2 or name.startswith(("embedding.", "output_layer.")) or name.endswith(".position_bias"):
            continue
        c = numel(shape) * _copies(spec, name)
        w += c * moe.top_k / moe.num_experts if (moe and is_routed_expert(name)) else c
    w += (1 + m.mtp.depth) * padded_vocab_size(spec) * m.hidden_size
    if m.attention is not None:
        attention = dsv4_estimate.attention_flops_per_token(spec)
    else:
        attention = 6 * (m.num_layers + m.mtp.depth) * m.seq_length * m.num_attention_heads * kv_channels(spec)
    return int(6 * w + attention)


# ---------------------------------------------------------------------------------------------
# memory per rank
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest rank (`rank`: its pipeline rank). Parameters that stay fp32 (mHC,
    contraction) are counted at 4 bytes also under bf16."""

    pipeline_rank: int
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    residual_streams: int
    distributed_optimizer: bool

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def to_json(self) -> dict:
        return {**asdict(self), "total": self.total}


def _param_rank_and_shard(spec: Spec, name: str, layer_rank: list[int], mtp_rank: int) -> tuple[list[int], int]:
    """(pipeline ranks holding this parameter, number of ranks one copy is split over)."""
    p, m = spec.parallel, spec.model
    last = p.pp - 1
    if name.startswith("decoder.layers."):
        ranks = [layer_rank[int(name.split(".")[2])]]
    elif name.startswith("embedding."):
        ranks = [0] + ([last] if p.pp > 1 and (m.tie_embeddings or m.mtp.depth) else [])
    elif name.startswith("mtp."):
        ranks = [mtp_rank]
    else:
        ranks = [last]
    if is_routed_expert(name):
        shard = p.etp * p.ep
    elif (is_mhc(name) or is_contraction(name) or name.endswith("norm.weight") or ".router." in name
          or (m.attention is not None and dsv4_estimate.is_tp_replicated(name))):
        shard = 1
    elif ".shared_experts." in name:
        shard = p.tp
    else:
        shard = p.tp
    return ranks, shard


def _activation_elements_per_token(spec: Spec, index: int = 0, act_bytes: int = 2) -> tuple[float, float]:
    """(elements stored per token for decoder layer `index`, of which the n-stream residual), per rank.

    Stored tensors per layer (h hidden, n streams, a = heads*kv, q = (heads+2g)*kv):
      attention: input h, norm output h, qkv output q, core-attention output a
      dense MLP: input h, norm output h, fc1 output 2*ffn, SwiGLU output ffn
      MoE: input h, norm output h, router logits E, per routed copy (top_k): input h,
           fc1 output 2*eff, activation eff; shared experts: 3*S*eff
      mHC (n > 1), per sub-layer: stream input n*h, aggregated input h, sub-layer output h,
           mapping logits n*n+2n
    Recompute: "full" keeps only the layer input (n*h); "mhc" keeps one n*h stream input per
    layer instead of the mHC tensors of both sub-layers; "mlp"/"moe" drop their MLP internals;
    "layernorm" drops norm outputs; "core_attn" saves nothing here (flash-style attention keeps
    no s x s scores). Tensor-parallel parts are divided by tp, the rest only under sequence
    parallelism; experts by etp. With [model.attention] the attention part is DeepSeek-V4's of the
    layer's kind (`dsv4_estimate.attention_activation_elements`, its own tp split).
    """
    m, p, t = spec.model, spec.parallel, spec.train
    h, n = m.hidden_size, m.mhc.streams
    heads, g, kv = m.num_attention_heads, m.num_query_groups or m.num_attention_heads, kv_channels(spec)
    tp, etp = p.tp, p.etp
    rep = tp if p.sequence_parallel else 1
    if t.recompute == "full":
        return n * h / rep, (n * h / rep if n > 1 else 0.0)
    recompute = set(t.recompute)

    norm_out = 0 if "layernorm" in recompute else 2 * h / rep
    if m.attention is not None:
        attention = dsv4_estimate.attention_activation_elements(spec, index, act_bytes)
    else:
        attention = h / rep + ((heads + 2 * g) * kv + heads * kv) / tp
    if m.moe is None:
        mlp = h / rep + (0 if "mlp" in recompute else 3 * m.ffn_hidden_size / tp)
    else:
        e, k, eff, s = m.moe.num_experts, m.moe.top_k, m.moe.expert_ffn_hidden_size, m.moe.num_shared_experts
        inner = k * (h + 3 * eff / etp) + 3 * s * eff / tp + e
        mlp = h / rep + (0 if "moe" in recompute else inner)
    residual = 0.0
    if n > 1:
        residual = n * h / rep if "mhc" in recompute else 2 * (n * h + 2 * h + n * n + 2 * n) / rep
    return norm_out + attention + mlp + residual, residual


def memory_per_rank(spec: Spec, world_size: Optional[int] = None,
                    distributed_optimizer: Optional[bool] = None) -> MemoryEstimate:
    """Peak bytes per rank (the busiest pipeline rank) for training `spec`.

    weights: 2 bytes/param under bf16 (4 under fp32; mHC, contraction, attention sinks and compressor
    position biases always 4).
    grads: 4 bytes/param (fp32 main grads). optimizer: Adam moments 8 bytes/param, plus a
    4-byte fp32 master copy of each bf16 param; split over dp (experts over the expert dp)
    with the distributed optimizer (train.distributed_optimizer; `auto` = on when dp > 1, as
    on GPU). activations: the layers of the rank x micro-batches in flight (pp - rank under
    1F1B, x (1 + (pp-1)/(pp*vpp)) interleaved) x tokens per micro-batch (s*b/cp), plus fp32
    logits (1 + MTP depth heads) on the last rank.
    """
    m, p, t = spec.model, spec.parallel, spec.train
    sizes = ParallelDims.of(spec, world_size)
    bf16 = t.precision == "bf16"
    if distributed_optimizer is None:
        distributed_optimizer = t.distributed_optimizer == "on" or (t.distributed_optimizer == "auto" and sizes.dp > 1)
    layer_rank, mtp_rank = layer_pipeline_ranks(spec)
    act_bytes = 2 if bf16 else 4

    per_rank = [dict(params=0.0, weights=0.0, grads=0.0, optimizer=0.0) for _ in range(p.pp)]
    for name, shape in compact_inventory(spec):
        ranks, shard = _param_rank_and_shard(spec, name, layer_rank, mtp_rank)
        count = numel(shape) * _copies(spec, name) / shard
        fp32 = is_mhc(name) or is_contraction(name) or name.endswith(dsv4_estimate.FP32_PARAMS) or not bf16
        opt = 8 + (0 if fp32 else 4)
        if distributed_optimizer:
            opt /= sizes.edp if is_routed_expert(name) else sizes.dp
        for r in ranks:
            acc = per_rank[r]
            acc["params"] += count
            acc["weights"] += count * (4 if fp32 else 2)
            acc["grads"] += count * 4
            acc["optimizer"] += count * opt

    per_token, residual_per_token = _activation_elements_per_token(spec)
    if m.attention is not None:  # layers differ by attention kind
        per_layer = [_activation_elements_per_token(spec, i, act_bytes) for i in range(m.num_layers + m.mtp.depth)]
    tokens = m.seq_length * t.micro_batch_size / p.cp
    best: Optional[MemoryEstimate] = None
    for r in range(p.pp):
        layers = layer_rank.count(r) + (m.mtp.depth if r == mtp_rank else 0)
        elements, residual_elements = layers * per_token, layers * residual_per_token
        if m.attention is not None:
            held = [i for i, lr in enumerate(layer_rank) if lr == r]
            held += [m.num_layers + k for k in range(m.mtp.depth)] if r == mtp_rank else []
            elements = sum(per_layer[i][0] for i in held)
            residual_elements = sum(per_layer[i][1] for i in held)
        in_flight = min(p.pp - r, sizes.num_microbatches)
        if p.vpp > 1:
            in_flight *= 1 + (p.pp - 1) / (p.pp * p.vpp)
        acts = elements * tokens * in_flight * act_bytes
        residual = residual_elements * tokens * in_flight * act_bytes
        if r == p.pp - 1:
            acts += (1 + m.mtp.depth) * tokens * padded_vocab_size(spec) / p.tp * 4
        acc = per_rank[r]
        est = MemoryEstimate(
            pipeline_rank=r, params=int(acc["params"]), weights=int(acc["weights"]), grads=int(acc["grads"]),
            optimizer=int(acc["optimizer"]), activations=int(acts), residual_streams=int(residual),
            distributed_optimizer=distributed_optimizer,
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------
# everything `dsv4 validate` shows
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    params: ParamCounts
    flops_per_token: int
    memory: MemoryEstimate
    parallel: ParallelDims

    def to_json(self) -> dict:
        return {
            "params": asdict(self.params),
            "flops_per_token": self.flops_per_token,
            "memory_per_rank": self.memory.to_json(),
            "parallel": self.parallel.to_json(),
        }


def estimate(spec: Spec, world_size: Optional[int] = None) -> Estimate:
    """Params, FLOPs/token, memory on the busiest rank and the parallel sizes for `world_size`."""
    return Estimate(
        params=param_counts(spec),
        flops_per_token=flops_per_token(spec),
        memory=memory_per_rank(spec, world_size),
        parallel=ParallelDims.of(spec, world_size),
    )
