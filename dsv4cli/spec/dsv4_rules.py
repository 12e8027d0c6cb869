"""Cross-field rules of DeepSeek-V4's own blocks ([model.attention], sqrtsoftplus / hash-routed MoE).

Called by `dsv4cli.spec.rules.check_rules` with its findings collector `f` (`f.err`, `f.warn`,
`f.pick`); every message carries the numbers it compares.
"""

from __future__ import annotations

from dsv4cli.spec.layout import layer_pipeline_ranks
from dsv4cli.spec.schema import Spec


def dsv4_rules(spec: Spec, f) -> None:
    """Rules of [model.attention] and of hash-routed MoE layers."""
    if spec.model.attention is not None:
        _attention_rules(spec, f)
    if spec.model.moe is not None and spec.model.moe.hash_layers:
        _hash_layer_rules(spec, f)
    if spec.model.moe is not None:
        _expert_bias_rules(spec.model.moe, f)


def _expert_bias_rules(moe, f) -> None:
    """An update rate set for routers that have no expert bias does nothing: say so."""
    if "expert_bias_update_rate" in moe.model_fields_set and moe.score_function != "sqrtsoftplus":
        f.warn("model.moe.expert_bias_update_rate",
               f"model.moe.expert_bias_update_rate ({moe.expert_bias_update_rate}) has no effect with "
               f"model.moe.score_function = '{moe.score_function}': only 'sqrtsoftplus' routers carry an expert bias")


def _attention_rules(spec: Spec, f) -> None:
    m, p, a = spec.model, spec.parallel, spec.model.attention
    layers = m.num_layers + m.mtp.depth
    where = f"model.num_layers + model.mtp.depth = {m.num_layers} + {m.mtp.depth} = {layers}"
    if len(a.layer_types) != layers:
        f.err("model.attention.layer_types",
              f"model.attention.layer_types has {len(a.layer_types)} entries; it needs one per layer ({where})")
    if a.compress_ratios is not None:
        _ratio_rules(a, layers, where, f)
    ratios = a.ratios()
    compressed = sorted({r for r, t in zip(ratios, a.layer_types) if t != "sliding" and r > 0})
    for r in compressed:
        if m.seq_length < r:
            f.warn(f.pick("model.seq_length", "model.attention.compress_ratios"),
                   f"model.seq_length ({m.seq_length}) is shorter than the compression ratio {r}: "
                   "those layers never see a compressed entry")
    csa = [r for r, t in zip(ratios, a.layer_types) if t == "csa" and r > 0]
    if csa and a.index_topk >= m.seq_length // min(csa):
        f.warn(f.pick("model.attention.index_topk", "model.seq_length"),
               f"model.attention.index_topk ({a.index_topk}) selects every compressed entry "
               f"(model.seq_length {m.seq_length} / ratio {min(csa)} = {m.seq_length // min(csa)} at most): "
               "the indexer chooses nothing")
    if a.rope_head_dim > min(a.head_dim, a.index_head_dim) or a.rope_head_dim % 2:
        f.err("model.attention.rope_head_dim",
              f"model.attention.rope_head_dim ({a.rope_head_dim}) must be even and at most head_dim ({a.head_dim}) "
              f"and index_head_dim ({a.index_head_dim})")
    if m.rotary_base <= 1:
        f.err("model.rotary_base", f"model.rotary_base ({m.rotary_base}) must be > 1 with [model.attention]")
    if m.num_attention_heads % a.o_groups:
        f.err(f.pick("model.attention.o_groups", "model.num_attention_heads"),
              f"model.attention.o_groups ({a.o_groups}) does not divide model.num_attention_heads "
              f"({m.num_attention_heads})")
    for key in ("num_query_groups", "kv_channels"):
        if f"model.{key}" in (getattr(spec, "_origins", None) or {}):
            f.warn(f"model.{key}", f"model.{key} is unused with [model.attention] (one shared KV head of "
                                   f"head_dim {a.head_dim})")
    # tensor parallelism splits query heads (the generic rule checks model.num_attention_heads),
    # output groups and indexer heads over the TP ranks
    for key, count in (("o_groups", a.o_groups), ("index_n_heads", a.index_n_heads)):
        if p.tp > 1 and count % p.tp:
            f.err(f.pick("parallel.tp", f"model.attention.{key}"),
                  f"parallel.tp ({p.tp}) does not divide model.attention.{key} ({count}): DeepSeek-V4 attention "
                  f"splits its {key} over the tensor-parallel ranks")


def _ratio_rules(a, layers: int, where: str, f) -> None:
    if len(a.compress_ratios) != layers:
        f.err("model.attention.compress_ratios",
              f"model.attention.compress_ratios has {len(a.compress_ratios)} entries; it needs one per layer ({where})")
    for i, (t, r) in enumerate(zip(a.layer_types, a.compress_ratios)):
        if t == "sliding" and r != 0:
            f.err("model.attention.compress_ratios",
                  f"layer {i} is 'sliding' but model.attention.compress_ratios[{i}] = {r} (must be 0)")
        elif t != "sliding" and r < 2:
            f.err("model.attention.compress_ratios",
                  f"layer {i} is '{t}' but model.attention.compress_ratios[{i}] = {r} (must be >= 2)")


def decoder_layer_ranks(spec: Spec) -> list[int]:
    """The pipeline rank of every decoder layer (`layout.layer_pipeline_ranks`); [] when the layers
    do not split evenly without a pp_layout (another rule says so)."""
    m, p = spec.model, spec.parallel
    if not p.pp_layout and m.num_layers % (p.pp * p.vpp):
        return []
    return layer_pipeline_ranks(spec)[0]


def _hash_layer_rules(spec: Spec, f) -> None:
    """Hash-routed layers look up token ids: only the first and the last pipeline rank read batches
    (the embedding and the loss / MTP need the tokens), so those are the ranks that can hold them."""
    moe, p = spec.model.moe, spec.parallel
    ranks = decoder_layer_ranks(spec)[: moe.hash_layers]
    blind = [(layer, r) for layer, r in enumerate(ranks) if r not in (0, p.pp - 1)]
    if p.pp > 1 and blind:
        layer, r = blind[0]
        f.err(f.pick("model.moe.hash_layers", "parallel.pp_layout", "parallel.pp"),
              f"model.moe.hash_layers ({moe.hash_layers}): hash-routed decoder layer {layer} sits on pipeline rank "
              f"{r} of {p.pp}, which has no token ids (only the first and the last pipeline rank read batches); "
              "use fewer hash layers or a parallel.pp_layout that puts them on the first rank")
