"""DeepSeek-V4 attention settings of one layer: the numbers `TransformerConfig` has no field for.

Kept apart from `TransformerConfig` (hidden size, head count and norm epsilon come from there) so
the spec builder can fold it into its own config class. Frozen: one instance describes one layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

AttentionKind = Literal["sliding", "compressed_sparse", "heavily_compressed"]
ATTENTION_KINDS: tuple[str, ...] = ("sliding", "compressed_sparse", "heavily_compressed")


@dataclass(frozen=True)
class RopeSettings:
    """One rotary setting. `yarn_factor=None` is plain RoPE at `theta`; otherwise YaRN's frequency
    blend (correction range from `beta_fast`/`beta_slow` over `original_max_position_embeddings`,
    floored/ceiled as DeepSeek and HF do). YaRN's attention factor is always 1.0: DSv4's RoPE is a
    pure rotation (the model relies on its Q/KV RMS norms instead of YaRN's mscale)."""

    theta: float = 10000.0
    yarn_factor: Optional[float] = None
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        if self.theta <= 1.0:
            raise ValueError(f"rope theta must be > 1, got {self.theta}")
        if self.yarn_factor is not None and self.yarn_factor <= 0:
            raise ValueError(f"rope yarn_factor must be > 0, got {self.yarn_factor}")


MAIN_ROPE = RopeSettings(theta=10000.0)
"""Sliding-window-only layers: plain RoPE, theta 1e4."""

COMPRESS_ROPE = RopeSettings(theta=160000.0, yarn_factor=16.0, original_max_position_embeddings=65536)
"""Compressed layers and their compressors/indexer: theta 1.6e5 with YaRN factor 16."""


@dataclass(frozen=True)
class Dsv4AttentionSettings:
    """Per-layer DeepSeek-V4 attention numbers (defaults: the public Flash sizes, a CSA layer).

    kind: "sliding" (window only), "compressed_sparse" (overlapping-window compressor + lightning
    indexer top-k), "heavily_compressed" (non-overlapping compressor, every entry); `compress_ratio`
    is a separate number (0 for "sliding", any ratio >= 1 otherwise). `rope_head_dim` trailing
    channels of each head (and of the indexer's heads) are rotated."""

    kind: AttentionKind = "compressed_sparse"
    compress_ratio: int = 4
    q_lora_rank: int = 1024
    head_dim: int = 512
    rope_head_dim: int = 64
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    indexer_loss_weight: float = 0.0  # 0: the indexer gets no loss (frozen)
    indexer_warmup_steps: int = 0  # iterations < this attend densely ('compressed_sparse' layers)
    main_rope: RopeSettings = field(default_factory=lambda: MAIN_ROPE)
    compress_rope: RopeSettings = field(default_factory=lambda: COMPRESS_ROPE)

    def __post_init__(self):
        problems = []
        if self.kind not in ATTENTION_KINDS:
            problems.append(f"kind {self.kind!r} is not one of {ATTENTION_KINDS}")
        elif self.kind == "sliding" and self.compress_ratio != 0:
            problems.append(f"compress_ratio must be 0 for a sliding-window layer, got {self.compress_ratio}")
        elif self.kind != "sliding" and self.compress_ratio < 1:
            problems.append(f"compress_ratio must be >= 1 for a {self.kind} layer, got {self.compress_ratio}")
        if self.rope_head_dim % 2 or not 0 < self.rope_head_dim <= min(self.head_dim, self.index_head_dim):
            problems.append(
                f"rope_head_dim ({self.rope_head_dim}) must be even and <= head_dim ({self.head_dim}) "
                f"and index_head_dim ({self.index_head_dim})"
            )
        for name in ("q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads", "index_topk"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.indexer_loss_weight < 0 or self.indexer_warmup_steps < 0:
            problems.append("indexer_loss_weight and indexer_warmup_steps must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def compressed(self) -> bool:
        return self.kind != "sliding"

    @property
    def rope(self) -> RopeSettings:
        """The layer's rotary setting: main for sliding-window layers, compress for compressed ones."""
        return self.compress_rope if self.compressed else self.main_rope
