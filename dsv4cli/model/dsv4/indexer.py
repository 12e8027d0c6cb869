"""Lightning indexer of compressed sparse attention: which `index_topk` compressed entries each query reads.

    q_residual [s, b, q_lora] --linear_q_up--> q [s, b, H_I, d_I] -> RoPE (compress setting, query positions)
    x [s, b, h] --overlapping compressor (d_I)--> k [n, b, d_I]
    x [s, b, h] --linear_weights--> w [s, b, H_I] * H_I^-1/2
    score[t, w] = sum_heads w[t, head] * ReLU(q[t, head] . k[w]) * d_I^-1/2         [s, b, n]
                  (added left to right in head order: ((head_0 + head_1) + head_2) + ...)
    top-k over the entries query t may see (w < (t + 1) // ratio); picks beyond those are -1.

The choice is discrete (no gradient reaches the indexer through attention); `IndexerOutput.scores`
keeps the differentiable scores for an indexer loss.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from dsv4cli.model.dsv4.attention_settings import Dsv4AttentionSettings
from dsv4cli.model.dsv4.compressor import (
    COMPRESSOR_TENSOR_NAMES,
    Dsv4Compressor,
    compressed_causal_mask,
    prefix_names,
)
from dsv4cli.model.dsv4.rope import Rotation
from dsv4cli.model.dsv4.tp_split import TpGroup, TpShardedState, chain_sum, copy_to, split_linear

# ours -> (DeepSeek's / the safetensors file's name, HF transformers' module name, relative to the indexer)
INDEXER_TENSOR_NAMES = {
    "linear_q_up.weight": ("wq_b.weight", "q_b_proj.weight"),
    "linear_weights.weight": ("weights_proj.weight", "scorer.weights_proj.weight"),
    **prefix_names(COMPRESSOR_TENSOR_NAMES, "compressor.", "compressor.", ""),
}


class IndexerOutput(NamedTuple):
    topk: Tensor  # [s, b, k] long, entry indices, -1 where fewer than k entries are visible; k = min(topk, n)
    scores: Tensor  # [s, b, n] fp32 raw index scores (before the causal mask)
    visible: Tensor  # [s, n] bool, the causal mask the top-k respected


def selected_entries(topk: Tensor, n_entries: int) -> Tensor:
    """topk [s, b, k] (-1 = none) -> [s, b, n] bool: the entries each query reads."""
    chosen = torch.zeros(*topk.shape[:-1], n_entries + 1, dtype=torch.bool, device=topk.device)
    chosen.scatter_(-1, torch.where(topk < 0, n_entries, topk), True)
    return chosen[..., :n_entries]


class Dsv4Indexer(TpShardedState, MegatronModule):
    """(x [s, b, h], q_residual [s, b, q_lora]) -> IndexerOutput (see the module docstring).

    Tensor parallelism `tp`: this rank holds H_I / T heads (linear_q_up, linear_weights); the
    compressor is replicated. The per-head weighted scores are added one head at a time, left to
    right in head order, rank r continuing rank r-1's partial sum (`chain_sum`), so every rank holds
    the one-process scores bit for bit and makes the one-process top-k choice."""

    TP_AXES = {"linear_q_up.weight": 0, "linear_weights.weight": 0}

    def __init__(self, config: TransformerConfig, settings: Dsv4AttentionSettings, tp: Optional[TpGroup] = None):
        super().__init__(config=config)
        self.tp = tp = tp or TpGroup()
        self.n_heads, self.head_dim = settings.index_n_heads, settings.index_head_dim
        self.local_heads = tp.split(self.n_heads, "index_n_heads")
        self.topk, self.ratio = settings.index_topk, settings.compress_ratio
        self.rope, self.rope_dim = settings.compress_rope, settings.rope_head_dim
        self.linear_q_up = split_linear(config, self.n_heads * self.head_dim, settings.q_lora_rank, tp, 0)
        self.linear_weights = split_linear(config, self.n_heads, config.hidden_size, tp, 0)
        self.compressor = Dsv4Compressor(
            config, self.head_dim, self.ratio, overlap=True, rope=self.rope, rope_dim=self.rope_dim
        )

    def head_score(self, x: Tensor, q_residual: Tensor, keys: Tensor, rotation: Rotation, head: int) -> Tensor:
        """Local head `head`'s weighted scores ReLU(q[t] . k[w]) * (w[t] * H_I^-1/2 * d_I^-1/2): [s, b, n] fp32.

        One head at a time, so every product has the same shape under any TP size (a matrix product's
        rounding may depend on its width) and the TP=T scores are the TP=1 ones bit for bit. The
        scales go into the [s, b, 1] weight (as DeepSeek's reference folds them), so backward keeps
        one [s, b, n] tensor per head: the ReLU output, which the product saves too."""
        d = self.head_dim
        q = rotation.rotate(F.linear(q_residual, self.linear_q_up.weight[head * d:(head + 1) * d]))  # [s, b, d_I]
        weight = F.linear(x, self.linear_weights.weight[head:head + 1]).float() * (self.n_heads**-0.5 * d**-0.5)
        return torch.einsum("sbd,nbd->sbn", q.float(), keys).relu() * weight  # weight [s, b, 1]

    def forward(self, hidden_states: Tensor, q_residual: Tensor) -> IndexerOutput:
        s, b, _ = hidden_states.shape
        keys = copy_to(self.compressor(hidden_states), self.tp).float()  # [n, b, d_I], replicated
        rotation = Rotation(self.rope, self.rope_dim, torch.arange(s, device=hidden_states.device))
        # [s, b, n]: ((score_0 + score_1) + ...) in head order across the ranks, whatever the TP size
        scores = chain_sum((self.head_score(hidden_states, q_residual, keys, rotation, head)
                            for head in range(self.local_heads)), self.tp)
        n = keys.shape[0]
        visible = compressed_causal_mask(s, n, self.ratio, device=scores.device)
        masked = scores.detach().masked_fill(~visible[:, None, :], float("-inf"))
        topk = masked.topk(min(self.topk, n), dim=-1).indices
        topk = torch.where(visible[:, None, :].expand(s, b, n).gather(-1, topk), topk, -1)
        return IndexerOutput(topk=topk, scores=scores, visible=visible)
