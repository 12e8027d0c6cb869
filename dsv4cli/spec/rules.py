"""Cross-field rules of a spec: which numbers must divide which, with the numbers in the message.

`check_rules(spec, world_size)` returns every error and warning at once (never raises);
`unsupported_features(spec)` lists what the spec can name but the builder cannot build yet
(warnings in `dsv4 validate`, errors in `dsv4 train`); `check_supported(spec)` raises for the first of
them (the builder calls it before it builds anything). Each Problem points at the line that
set the key it names (see `dsv4cli.spec.load.locate`).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from dsv4cli.spec.dsv4_rules import dsv4_rules
from dsv4cli.spec.layout import LAYOUT_CHARS, ParallelDims, default_world_size, parse_pp_layout
from dsv4cli.spec.load import locate
from dsv4cli.spec.problems import Problem, Severity
from dsv4cli.spec.schema import Spec

UNSUPPORTED: tuple[tuple[str, Callable[[Spec], bool], str], ...] = (
    (
        "model.moe.hash_layers",
        lambda s: _hash_routed(s) and s.model.moe.score_function != "sqrtsoftplus",
        "hash routing (hash_layers > 0) is not supported with this score_function: it weights experts by "
        "DeepSeek-V4's sqrt(softplus) scores (set model.moe.score_function = 'sqrtsoftplus')",
    ),
    (
        "model.moe.hash_layers",
        lambda s: _hash_routed(s) and s.model.mhc.streams == 1,
        "hash routing (hash_layers > 0) is not supported with model.mhc.streams = 1 yet: megatron's own layer "
        "does not pass the token ids on",
    ),
    (
        "train.recompute",
        lambda s: _hash_routed(s) and isinstance(s.train.recompute, list) and "moe" in s.train.recompute,
        "selective 'moe' recompute is not supported with hash routing (hash_layers > 0): megatron re-runs the "
        "MoE in backward without the token ids (use 'full' or leave 'moe' out)",
    ),
    (
        "model.moe.aux_loss_coeff",
        lambda s: s.model.moe is not None and s.model.moe.score_function == "sqrtsoftplus"
        and s.model.moe.aux_loss_coeff > 0,
        "an auxiliary load-balancing loss is not supported with score_function 'sqrtsoftplus' (DeepSeek-V4's "
        "routers balance with the expert bias): set model.moe.aux_loss_coeff = 0",
    ),
    (
        "parallel.cp",
        lambda s: s.parallel.cp > 1,
        "context parallelism (cp > 1) is not supported by the model builder yet",
    ),
    (
        "parallel.pp_layout",
        lambda s: _mtp_outside_last_stage(s),
        "MTP layers outside the last pipeline stage (standalone MTP) are not supported with mHC yet",
    ),
)
"""(key, applies(spec), message): the ONE list of features the spec names but dsv4 cannot build."""

BYTE_VOCAB = 256


def _hash_routed(spec: Spec) -> bool:
    return spec.model.moe is not None and spec.model.moe.hash_layers > 0


def _mtp_outside_last_stage(spec: Spec) -> bool:
    """With mHC, the builder runs MTP next to the loss: every `m` must be in the last layout stage."""
    m, layout = spec.model, spec.parallel.pp_layout
    if m.mhc.streams == 1 or m.mtp.depth == 0 or not layout:
        return False
    try:
        stages = parse_pp_layout(layout)
    except ValueError:
        return False
    return stages[-1].count("m") != "".join(stages).count("m")


def _problem(spec: Spec, key: str, message: str, severity: Severity = "error") -> Problem:
    file, line = locate(spec, key)
    return Problem(file, line, key, message, severity)


def _pick(spec: Spec, *keys: str) -> str:
    """The first of `keys` the spec files set explicitly (else the first): the key to blame."""
    origins = getattr(spec, "_origins", None) or {}
    return next((k for k in keys if k in origins), keys[0])


def unsupported_features(spec: Spec) -> list[Problem]:
    """Features named by the spec that the builder does not support yet (as warnings)."""
    return [_problem(spec, key, message, "warning") for key, applies, message in UNSUPPORTED if applies(spec)]


class UnsupportedSpecError(NotImplementedError):
    """The spec asks for something the builder does not implement yet (one-line message)."""


def check_supported(spec: Spec) -> None:
    """Raise UnsupportedSpecError (`key: message`) for the first feature of UNSUPPORTED the spec uses."""
    for key, applies, message in UNSUPPORTED:
        if applies(spec):
            raise UnsupportedSpecError(f"{key}: {message}")


class _Findings:
    """Collects problems of one spec; `err`/`warn` locate the blamed key's file and line."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.problems: list[Problem] = []

    def err(self, key: str, message: str) -> None:
        self.problems.append(_problem(self.spec, key, message))

    def warn(self, key: str, message: str) -> None:
        self.problems.append(_problem(self.spec, key, message, "warning"))

    def pick(self, *keys: str) -> str:
        return _pick(self.spec, *keys)


def check_rules(spec: Spec, world_size: Optional[int] = None, *, world_rules: bool = True) -> list[Problem]:
    """Every cross-field error and warning of `spec` for `world_size` processes, incl. the
    not-yet-supported features (as warnings).

    world_size None -> launch.nproc_per_node * launch.nnodes. `world_rules=False` skips the
    rules that depend on the world size (dp, expert grid, global batch).
    """
    f = _Findings(spec)
    _attention_rules(spec, f)
    _pipeline_rules(spec, f)
    _moe_rules(spec, f)
    dsv4_rules(spec, f)
    if world_rules:
        _world_rules(spec, world_size or default_world_size(spec), f)
    _stream_rules(spec, f)
    _schedule_rules(spec, f)
    _data_rules(spec, f)
    if spec.checkpoint.load is not None and not os.path.exists(spec.checkpoint.load):
        f.err("checkpoint.load", f"checkpoint to load not found: {spec.checkpoint.load}")
    return f.problems + unsupported_features(spec)


def _recompute_list(spec: Spec) -> list[str]:
    return spec.train.recompute if isinstance(spec.train.recompute, list) else []


def _attention_rules(spec: Spec, f: _Findings) -> None:
    """Head counts, head dim and FFN width vs tensor parallelism; sequence/context parallel lengths."""
    m, p = spec.model, spec.parallel
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    if m.kv_channels is None and m.hidden_size % heads:
        f.err(f.pick("model.hidden_size", "model.num_attention_heads"),
              f"model.hidden_size ({m.hidden_size}) is not divisible by model.num_attention_heads ({heads}); "
              "set model.kv_channels")
    if heads % groups:
        f.err("model.num_query_groups",
              f"model.num_attention_heads ({heads}) is not divisible by model.num_query_groups ({groups})")
    if heads % p.tp:
        f.err(f.pick("parallel.tp", "model.num_attention_heads"),
              f"parallel.tp ({p.tp}) does not divide model.num_attention_heads ({heads})")
    if groups % p.tp and p.tp % groups:
        f.err(f.pick("parallel.tp", "model.num_query_groups"),
              f"query groups ({groups}) must be a multiple or a divisor of parallel.tp ({p.tp})")
    if m.moe is None and m.ffn_hidden_size % p.tp:
        f.err(f.pick("parallel.tp", "model.ffn_hidden_size"),
              f"parallel.tp ({p.tp}) does not divide model.ffn_hidden_size ({m.ffn_hidden_size})")
    if p.sequence_parallel and p.tp == 1:
        f.err("parallel.sequence_parallel", "sequence_parallel needs parallel.tp > 1 (tp = 1)")
    if p.sequence_parallel and m.seq_length % p.tp:
        f.err(f.pick("model.seq_length", "parallel.tp"),
              f"model.seq_length ({m.seq_length}) is not divisible by parallel.tp ({p.tp}) under sequence_parallel")
    if p.cp > 1 and m.seq_length % (2 * p.cp):
        f.err(f.pick("model.seq_length", "parallel.cp"),
              f"model.seq_length ({m.seq_length}) is not divisible by 2*parallel.cp ({2 * p.cp})")


def _pipeline_rules(spec: Spec, f: _Findings) -> None:
    """Decoder layers (+ MTP) over pp*vpp stages, evenly or as pp_layout says."""
    m, p = spec.model, spec.parallel
    if p.vpp > 1 and p.pp == 1:
        f.err("parallel.vpp", f"parallel.vpp ({p.vpp}) needs parallel.pp > 1 (pp = 1)")
    if p.pp_layout is not None:
        f.problems.extend(_layout_problems(spec))
    elif m.num_layers % (p.pp * p.vpp):
        f.err(f.pick("model.num_layers", "parallel.pp", "parallel.vpp"),
              f"model.num_layers ({m.num_layers}) is not divisible by parallel.pp*parallel.vpp "
              f"({p.pp}*{p.vpp} = {p.pp * p.vpp}); change the sizes or set parallel.pp_layout")


def _moe_rules(spec: Spec, f: _Findings) -> None:
    """Experts vs ep/etp, top_k, hash layers; MoE under tp needs sequence parallelism, with ep = 1 etp = tp."""
    m, p = spec.model, spec.parallel
    moe = m.moe
    if moe is None:
        if p.ep > 1:
            f.err("parallel.ep", f"parallel.ep ({p.ep}) > 1 needs a [model.moe] section")
        if p.etp > 1:
            f.err("parallel.etp", f"parallel.etp ({p.etp}) > 1 needs a [model.moe] section")
        if "moe" in _recompute_list(spec):
            f.warn("train.recompute", "'moe' is listed but the model has no [model.moe]; nothing to recompute")
        return
    if moe.num_experts % p.ep:
        f.err(f.pick("parallel.ep", "model.moe.num_experts"),
              f"parallel.ep ({p.ep}) does not divide model.moe.num_experts ({moe.num_experts})")
    if moe.top_k > moe.num_experts:
        f.err("model.moe.top_k", f"model.moe.top_k ({moe.top_k}) exceeds model.moe.num_experts ({moe.num_experts})")
    if moe.expert_ffn_hidden_size % p.etp:
        f.err(f.pick("parallel.etp", "model.moe.expert_ffn_hidden_size"),
              f"parallel.etp ({p.etp}) does not divide model.moe.expert_ffn_hidden_size ({moe.expert_ffn_hidden_size})")
    shared = moe.num_shared_experts * moe.expert_ffn_hidden_size
    if shared and shared % p.tp:
        f.err(f.pick("parallel.tp", "model.moe.num_shared_experts"),
              f"parallel.tp ({p.tp}) does not divide the shared-expert FFN size "
              f"(num_shared_experts*expert_ffn_hidden_size = {shared})")
    if moe.hash_layers > m.num_layers:
        f.err("model.moe.hash_layers",
              f"model.moe.hash_layers ({moe.hash_layers}) exceeds model.num_layers ({m.num_layers})")
    if p.tp > 1 and not p.sequence_parallel:
        f.err("parallel.sequence_parallel",
              f"MoE with parallel.tp = {p.tp} needs parallel.sequence_parallel = true (Megatron-Core refuses "
              "to train MoE under tensor parallelism without it)")
    if p.ep == 1 and p.etp != p.tp:
        # megatron-core 0.16 tags a parameter for the expert grad buffers only under expert parallelism:
        # ColumnParallelLinear/RowParallelLinear.__init__ (tensor_parallel/layers.py; TELinear and
        # TEGroupedLinear alike) set `allreduce = not (is_expert and expert_model_parallel_size > 1)`.
        # With ep = 1 the experts keep allreduce=True, so DistributedDataParallel.__init__ puts their grads
        # in the dense buffers, reduced over the data-parallel group (not the expert-data-parallel one).
        # That is right only when etp = tp: with etp < tp the tp ranks' grads of the same expert weights
        # (from their sequence slices) are never summed; with etp > tp different expert slices are summed.
        # (Megatron-LM later tags experts when ep > 1 or etp != tp: NVIDIA/Megatron-LM PR 5916.)
        f.err(f.pick("parallel.etp", "parallel.tp", "parallel.ep"),
              f"MoE with parallel.ep = 1 needs parallel.etp = parallel.tp (tp = {p.tp}, etp = {p.etp}): with "
              "ep = 1 megatron-core treats the experts as dense weights and reduces their gradients over "
              "data parallelism only, which is wrong unless the experts are split like the dense layers")


def _world_rules(spec: Spec, world: int, f: _Findings) -> None:
    """world = tp*pp*cp*dp = etp*ep*pp*edp; global batch = micro batch * dp * micro-batches."""
    launch = spec.launch
    dims = ParallelDims.of(spec, world)
    for keys, message in dims.grid_problems() + dims.batch_problems():
        f.err(f.pick(*keys), message)
    if launch.node_rank >= launch.nnodes:
        f.err("launch.node_rank", f"launch.node_rank ({launch.node_rank}) must be < launch.nnodes ({launch.nnodes})")


def _stream_rules(spec: Spec, f: _Findings) -> None:
    """Settings that mean nothing with a single residual stream."""
    m = spec.model
    if m.mhc.streams > 1:
        return
    if m.contraction.mode == "average":
        f.warn(f.pick("model.contraction.mode", "model.mhc.streams"),
               "contraction mode 'average' with model.mhc.streams = 1 is meaningless (one stream, nothing to contract)")
    if "mhc" in _recompute_list(spec):
        f.warn("train.recompute", "'mhc' is listed but model.mhc.streams = 1 (no hyper-connections)")


def _schedule_rules(spec: Spec, f: _Findings) -> None:
    t = spec.train
    if t.min_lr > t.lr:
        f.err(f.pick("train.min_lr", "train.lr"), f"train.min_lr ({t.min_lr}) exceeds train.lr ({t.lr})")
    if t.warmup_steps >= t.steps:
        f.warn(f.pick("train.warmup_steps", "train.steps"),
               f"train.warmup_steps ({t.warmup_steps}) >= train.steps ({t.steps}): "
               "the peak learning rate is never reached")


def _data_rules(spec: Spec, f: _Findings) -> None:
    """Indexed dataset prefixes and blend weights; the tokenizer file; byte vocabulary size."""
    d, m = spec.data, spec.model
    if d.source == "indexed" and not d.paths:
        f.err(f.pick("data.paths", "data.source"), "data.source = 'indexed' needs data.paths (dataset prefixes)")
    if d.source != "indexed" and d.paths:
        f.warn("data.paths", f"data.paths is ignored with data.source = '{d.source}'")
    if d.weights and len(d.weights) != len(d.paths):
        f.err("data.weights", f"data.weights has {len(d.weights)} entries but data.paths has {len(d.paths)}")
    if any(w <= 0 for w in d.weights):
        f.err("data.weights", f"every blend weight must be > 0, got {d.weights}")
    if d.source == "indexed":
        for prefix in d.paths:
            missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.exists(prefix + ext)]
            if missing:
                f.err("data.paths", f"indexed dataset {prefix} lacks {' and '.join(missing)}")
    if d.tokenizer == "byte":
        if d.source == "builtin" and m.vocab_size < BYTE_VOCAB:
            f.err(f.pick("model.vocab_size", "data.tokenizer"),
                  f"model.vocab_size ({m.vocab_size}) is smaller than the byte tokenizer's {BYTE_VOCAB} tokens")
    elif not os.path.isfile(d.tokenizer):
        f.err("data.tokenizer", f"tokenizer file not found: {d.tokenizer}")


def _layout_problems(spec: Spec) -> list[Problem]:
    """pp_layout must parse, have pp*vpp stages, and place E, every t, every m and L correctly."""
    m, p = spec.model, spec.parallel
    key = "parallel.pp_layout"
    try:
        stages = parse_pp_layout(p.pp_layout or "")
    except ValueError as e:
        return [_problem(spec, key, str(e))]
    out = []
    flat = "".join(stages)
    if len(stages) != p.pp * p.vpp:
        out.append(_problem(spec, key, f"has {len(stages)} stages but parallel.pp*parallel.vpp = "
                                       f"{p.pp}*{p.vpp} = {p.pp * p.vpp}"))
    counts = {c: flat.count(c) for c in LAYOUT_CHARS}
    if counts["t"] != m.num_layers:
        out.append(_problem(spec, key, f"has {counts['t']} decoder layers (t) but model.num_layers = {m.num_layers}"))
    if counts["m"] != m.mtp.depth:
        out.append(_problem(spec, key, f"has {counts['m']} MTP layers (m) but model.mtp.depth = {m.mtp.depth}"))
    if counts["E"] != 1 or not flat.startswith("E"):
        out.append(_problem(spec, key, f"must start with the embedding E exactly once (found {counts['E']})"))
    if counts["L"] != 1 or not flat.endswith("L"):
        out.append(_problem(spec, key, f"must end with the loss L exactly once (found {counts['L']})"))
    if "m" in flat and "t" in flat[flat.index("m"):]:
        out.append(_problem(spec, key, "decoder layers (t) must come before MTP layers (m)"))
    mtp_stages = [i for i, s in enumerate(stages) if "m" in s]
    if len(mtp_stages) > 1:
        out.append(_problem(spec, key, f"all MTP layers must be in one stage (found in stages {mtp_stages})"))
    elif mtp_stages and len(stages) == p.pp * p.vpp and mtp_stages[0] // p.pp != p.vpp - 1:
        out.append(_problem(spec, key, "MTP layers must be in the last virtual pipeline chunk of their rank"))
    return out
