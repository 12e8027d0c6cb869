"""The spec schema: pydantic models for every TOML section (no torch import).

Field names are a contract shared by docs, the builder, training and the checkpoint tools.
Single-field range checks live here; rules that relate several fields live in
`dsv4cli.spec.rules` so that all problems can be reported at once with their numbers.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

RECOMPUTE_MODULES = ("mhc", "core_attn", "mlp", "moe", "layernorm")
"""Modules `train.recompute` may name (or the string "full" for whole layers)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MhcSpec(_Section):
    """Manifold-constrained hyper-connections (docs/design.md §2.2)."""

    streams: int = Field(4, ge=1, le=16, description="Residual streams n; 1 disables hyper-connections.")
    sinkhorn_iterations: int = Field(20, ge=1, description="Sinkhorn iterations for H_res.")
    gating_init: float = Field(0.01, description="Initial value of alpha_pre/alpha_post/alpha_res.")
    eps: float = Field(1e-6, gt=0, lt=0.1, description="eps of the mHC mappings (RMS, H_pre floor, Sinkhorn).")


class ContractionSpec(_Section):
    """Output contraction of n streams to one, before the final norm (docs/design.md §2.3)."""

    mode: Literal["learned", "average"] = Field("learned", description="'learned' (DSv4) or legacy 'average'.")
    eps: float = Field(1e-6, gt=0, lt=0.1, description="eps of the learned contraction (RMS and floor).")


class MtpSpec(_Section):
    """Multi-token prediction (docs/design.md §2.4)."""

    depth: int = Field(1, ge=0, le=8, description="MTP depths D; 0 disables MTP.")
    loss_scale: float = Field(0.1, ge=0, description="Total MTP loss weight; each depth gets loss_scale / D.")


class MoeSpec(_Section):
    """Mixture of experts (megatron-core MoE layer). Absent section = dense SwiGLU MLP."""

    num_experts: int = Field(..., ge=1, description="Routed experts per MoE layer.")
    top_k: int = Field(..., ge=1, description="Experts per token.")
    num_shared_experts: int = Field(0, ge=0, description="Shared (always-on) experts.")
    expert_ffn_hidden_size: int = Field(..., ge=1, description="FFN hidden size of one expert.")
    score_function: Literal["softmax", "sigmoid", "sqrtsoftplus"] = Field(
        "softmax", description="Router score function."
    )
    routed_scaling_factor: float = Field(1.0, gt=0, description="Scale of the routed experts' output.")
    hash_layers: int = Field(0, ge=0, description="Leading layers routed by a fixed token-id -> expert table.")
    aux_loss_coeff: float = Field(0.0, ge=0, description="Load-balancing auxiliary loss coefficient.")
    expert_bias_update_rate: float = Field(
        1e-3, ge=0, le=1,
        description="No-aux-loss expert bias ('sqrtsoftplus' top-k routers): after each training step every "
                    "bias moves by this much against its expert's load over all ranks (up when under the mean "
                    "load, down when over); 1e-3 as in DeepSeek-V3; 0 = frozen.",
    )
    swiglu_limit: float = Field(
        0.0, ge=0, description="Clamp of the experts' SwiGLU inputs (gate <= limit, |up| <= limit); 0 = off."
    )


DEFAULT_COMPRESS_RATIO = {"sliding": 0, "csa": 4, "hca": 128}
"""The release's compression ratio of each attention kind (used where compress_ratios is not set)."""


class AttentionSpec(_Section):
    """DeepSeek-V4 attention: low-rank query, one shared KV head, attention sinks, grouped output
    projection, a sliding window, and per layer compressed entries. Absent section = megatron's
    standard attention (model.num_query_groups, model.kv_channels)."""

    layer_types: list[Literal["sliding", "csa", "hca"]] = Field(
        ..., min_length=1,
        description="Per layer: 'sliding' (window only), 'csa' (compressed sparse attention), 'hca' (heavily "
                    "compressed attention); decoder layers first, then one per MTP depth.",
    )
    compress_ratios: Optional[list[int]] = Field(
        None, description="Per layer compression ratio (0 for 'sliding'); default 4 for 'csa', 128 for 'hca'."
    )
    head_dim: int = Field(512, ge=2, description="Head dim of queries and of the shared KV head.")
    rope_head_dim: int = Field(
        64, ge=2, multiple_of=2, description="Trailing dims of each head that get (interleaved) RoPE (even)."
    )
    q_lora_rank: int = Field(1024, ge=1, description="Rank of the low-rank query projection.")
    o_groups: int = Field(8, ge=1, description="Head groups of the grouped output projection.")
    o_lora_rank: int = Field(
        1024, ge=1, description="Per-group rank of the grouped output projection (each group of heads is projected "
                                "to this rank, then all groups together to the hidden size)."
    )
    sliding_window: int = Field(128, ge=1, description="Tokens each query sees uncompressed (incl. itself).")
    index_n_heads: int = Field(64, ge=1, description="Query heads of the lightning indexer ('csa' layers).")
    index_head_dim: int = Field(128, ge=1, description="Head dim of the lightning indexer.")
    index_topk: int = Field(512, ge=1, description="Compressed entries each query keeps ('csa' layers).")
    indexer_loss_weight: float = Field(
        0.0, ge=0, description="Weight of the indexer's KL loss against the dense attention ('csa' layers; it "
                               "trains the indexer only). 0 = the indexer is not trained.")
    indexer_warmup_steps: int = Field(
        0, ge=0, description="Iterations at the start of training in which 'csa' layers attend densely (every "
                             "visible compressed entry) and, with indexer_loss_weight > 0, only the indexer "
                             "trains (every other parameter, its Adam moments and the expert biases stay "
                             "fixed); then sparse top-k attention, everything training, the indexer loss "
                             "continuing.")
    compress_rope_theta: float = Field(160000.0, gt=1, description="RoPE base of compressed layers (main: model.rotary_base).")
    yarn_factor: float = Field(1.0, ge=1, description="YaRN scaling of the compressed layers' RoPE (1 = off).")
    yarn_original_max_position: int = Field(65536, ge=1, description="YaRN's original context length.")
    yarn_beta_fast: float = Field(32.0, gt=0, description="YaRN beta_fast.")
    yarn_beta_slow: float = Field(1.0, gt=0, description="YaRN beta_slow.")

    def ratios(self) -> list[int]:
        """Compression ratio of every layer (decoder layers, then MTP depths)."""
        if self.compress_ratios is not None:
            return list(self.compress_ratios)
        return [DEFAULT_COMPRESS_RATIO[t] for t in self.layer_types]


class ModelSpec(_Section):
    """GPT-style decoder with DSv4 conventions: RMSNorm, SwiGLU, rotary embeddings, no linear biases."""

    num_layers: int = Field(..., ge=1, description="Decoder layers (MTP layers not included).")
    hidden_size: int = Field(..., ge=1, description="Hidden size h.")
    num_attention_heads: int = Field(..., ge=1, description="Attention heads.")
    num_query_groups: Optional[int] = Field(None, ge=1, description="KV groups (GQA); default = heads.")
    kv_channels: Optional[int] = Field(None, ge=1, description="Head dim; default hidden_size / heads.")
    ffn_hidden_size: int = Field(..., ge=1, description="Dense SwiGLU FFN hidden size.")
    vocab_size: int = Field(..., ge=1, description="Tokenizer vocabulary size.")
    vocab_pad_multiple: int = Field(128, ge=1, description="Pad the vocabulary to a multiple of this (times tp).")
    seq_length: int = Field(..., ge=1, description="Training sequence length.")
    norm_eps: float = Field(1e-6, gt=0, description="RMSNorm eps.")
    tie_embeddings: bool = Field(False, description="Share input embedding and output layer weights.")
    rotary_base: float = Field(10000.0, gt=0, description="RoPE base.")
    init_method_std: float = Field(0.02, gt=0, description="Std of the normal init of linear weights.")
    mhc: MhcSpec = Field(default_factory=MhcSpec)
    contraction: ContractionSpec = Field(default_factory=ContractionSpec)
    mtp: MtpSpec = Field(default_factory=MtpSpec)
    moe: Optional[MoeSpec] = None
    attention: Optional[AttentionSpec] = None


class ParallelSpec(_Section):
    """Parallel layout; data-parallel size is derived from the world size."""

    tp: int = Field(1, ge=1, description="Tensor parallel size.")
    pp: int = Field(1, ge=1, description="Pipeline parallel size.")
    vpp: int = Field(1, ge=1, description="Virtual pipeline stages per pipeline rank (1 = off).")
    cp: int = Field(1, ge=1, description="Context parallel size.")
    ep: int = Field(1, ge=1, description="Expert parallel size.")
    etp: Optional[int] = Field(
        None, ge=1, description="Expert tensor parallel size (unset: tp for MoE with ep = 1, the one size "
        "megatron-core trains correctly there; otherwise 1).")
    sequence_parallel: Optional[bool] = Field(
        None, description="Sequence parallelism (needs tp > 1; unset: on for MoE with tp > 1, which "
        "megatron-core requires, otherwise off).")
    pp_layout: Optional[str] = Field(
        None, description="Megatron pipeline layout: E embedding, t layer, m MTP layer, L loss, | stage separator."
    )


class TrainSpec(_Section):
    """Optimisation and the training loop."""

    steps: int = Field(100, ge=1, description="Optimizer steps in total.")
    micro_batch_size: int = Field(1, ge=1, description="Sequences per micro-batch per data-parallel rank.")
    global_batch_size: int = Field(8, ge=1, description="Sequences per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr: float = Field(3e-5, ge=0, description="Final learning rate of the cosine decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1 (first-moment decay).")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2 (second-moment decay).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW eps (denominator floor).")
    clip_grad: float = Field(1.0, ge=0, description="Global gradient-norm clip (0 = off).")
    seed: int = Field(1234, ge=0, description="Random seed.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Activation/weight precision.")
    log_interval: int = Field(10, ge=1, description="Steps between metric lines.")
    eval_interval: int = Field(50, ge=0, description="Steps between held-out evaluations (0 = off).")
    eval_batches: int = Field(4, ge=1, description="Global batches per held-out evaluation.")
    exit_interval: int = Field(0, ge=0, description="Save and exit after this many steps of this run (0 = off).")
    recompute: Union[Literal["full"], list[Literal["mhc", "core_attn", "mlp", "moe", "layernorm"]]] = Field(
        default_factory=list, description="Modules to recompute in backward, or 'full'."
    )
    distributed_optimizer: Literal["auto", "on", "off"] = Field(
        "auto", description="Megatron distributed optimizer; auto = on with CUDA and dp > 1."
    )

    @field_validator("recompute", mode="before")
    @classmethod
    def _recompute_names(cls, value):
        """One clear message instead of pydantic's per-union-branch errors."""
        allowed = ", ".join(repr(m) for m in RECOMPUTE_MODULES)
        if isinstance(value, str):
            if value != "full":
                raise ValueError(f"must be \"full\" or a list of {allowed}, got {value!r}")
            return value
        if isinstance(value, list):
            bad = [v for v in value if v not in RECOMPUTE_MODULES]
            if bad:
                raise ValueError(f"unknown module(s) {', '.join(repr(b) for b in bad)}; choose from {allowed}")
            return value
        raise ValueError(f"must be \"full\" or a list of {allowed}, got {value!r}")


class DataSpec(_Section):
    """Training data."""

    source: Literal["builtin", "mock", "indexed"] = Field(
        "builtin", description="builtin corpus (Python stdlib sources), mock, or Megatron indexed datasets."
    )
    paths: list[str] = Field(default_factory=list, description="Indexed dataset prefixes (source = indexed).")
    weights: list[float] = Field(default_factory=list, description="Blend weights, one per path.")
    tokenizer: str = Field("byte", description="'byte' or path to a local HF tokenizer.json.")
    eos_token_ids: list[int] = Field(
        default_factory=list, description="Token ids that end a sequence in `dsv4 generate` (empty: never stop early)."
    )
    valid_fraction: float = Field(0.05, gt=0, lt=1, description="Held-out share of documents.")


class CheckpointSpec(_Section):
    """Checkpointing (Megatron torch_dist layout)."""

    dir: str = Field("runs/default", description="Run directory: checkpoints and metrics.jsonl.")
    interval: int = Field(0, ge=0, description="Steps between checkpoints (0 = only at the end).")
    keep_last: int = Field(0, ge=0, description="Keep this many newest checkpoints (0 = all).")
    load: Optional[str] = Field(None, description="Checkpoint to resume from (default: dir's latest).")
    load_optimizer: bool = Field(
        True,
        description="Restore the optimizer state (Adam moments) on resume; false starts a fresh optimizer from "
        "the saved weights, step, learning-rate schedule and data position (for a checkpoint whose optimizer "
        "state does not fit the new parallel layout).",
    )


class LaunchSpec(_Section):
    """torchrun launch settings."""

    nproc_per_node: int = Field(1, ge=1, description="Processes (GPUs) per node.")
    nnodes: int = Field(1, ge=1, description="Nodes; world size = nproc_per_node * nnodes.")
    node_rank: int = Field(0, ge=0, description="This node's rank, 0 .. nnodes-1.")
    rdzv_endpoint: str = Field("localhost:29500", description="HOST:PORT of the c10d rendezvous.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl with CUDA, gloo otherwise.")


class Spec(_Section):
    """A complete dsv4 spec (after `extends` and `--set` are resolved)."""

    extends: Optional[str] = Field(None, description="Base spec file, relative to this file.")
    name: Optional[str] = Field(None, description="Run name (default: the spec file's stem).")
    model: ModelSpec
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    launch: LaunchSpec = Field(default_factory=LaunchSpec)

    @model_validator(mode="after")
    def _parallel_defaults(self) -> "Spec":
        """Unset parallel.etp / parallel.sequence_parallel -> the value the model's layout needs."""
        p, moe = self.parallel, self.model.moe is not None
        if p.etp is None:
            p.etp = p.tp if moe and p.ep == 1 else 1
        if p.sequence_parallel is None:
            p.sequence_parallel = moe and p.tp > 1
        return self

    # Where each dotted key was set: {"model.mhc.streams": (file, line)}; filled by the loader.
    _origins: dict = PrivateAttr(default_factory=dict)
    # The spec file as the user named it (None when the Spec was built in code).
    _root: Optional[str] = PrivateAttr(default=None)


def dotted(data: dict, prefix: str = "") -> dict:
    """Nested tables -> {"model.mhc.streams": 4, ...} (a spec's model_dump, a TOML document)."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(dotted(value, name))
        else:
            out[name] = value
    return out
