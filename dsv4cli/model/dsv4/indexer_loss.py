"""The lightning indexer's training loss (DeepSeek-V3.2's DSA recipe on DeepSeek-V4's compressed entries).

For every query t of a compressed sparse attention layer, over the compressed entries t may see:

    p_t = the dense attention's probabilities on those entries, summed over heads, renormalised
          (detached: a target; dense = every visible entry attended, not only the top-k)
    q_t = softmax of the indexer's scores over the same entries
    loss = mean over queries that see >= 1 entry of KL(p_t || q_t) = sum_w p_t[w] (log p_t[w] - log q_t[w])

The indexer's inputs are detached, so the loss trains the indexer and nothing else. It enters the
backward through `IndexerLossAutoScaler` (an identity on the attention output whose backward
injects d(weight * loss) scaled like the main loss), as megatron does for MoE auxiliary and MTP losses.

Dense warm-up: while the iteration the training loop set (`set_iteration`) is below
`indexer_warmup_steps`, the layer attends densely, and with an indexer loss the training step
changes the indexer's parameters only (dsv4cli.build.optimizer.indexer_only_step). The iteration is
the only input, so resuming in the middle of the warm-up is exact.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor


class IndexerLossAutoScaler(torch.autograd.Function):
    """forward(output, loss) = output; backward gives `loss` the gradient `scale` (the main loss's
    backward scale: optimizer loss scale / micro-batches), so it trains without touching the output."""

    scale: Optional[Tensor] = None

    @staticmethod
    def forward(ctx, output: Tensor, loss: Tensor) -> Tensor:
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (loss,) = ctx.saved_tensors
        scale = IndexerLossAutoScaler.scale
        grad_loss = torch.ones_like(loss) if scale is None else torch.ones_like(loss) * scale.to(loss.device)
        return grad_output, grad_loss

    @staticmethod
    def set_loss_scale(scale: Tensor) -> None:
        """Set by the training step before its micro-batches run (dsv4cli.train.runtime)."""
        IndexerLossAutoScaler.scale = scale.detach()


def indexer_kl(scores: Tensor, entry_probs: Tensor, visible: Tensor) -> Tensor:
    """KL(dense attention || indexer) averaged over the queries that see at least one entry.

    scores [s, b, n] (indexer, differentiable; identical on every TP rank), entry_probs [b, T, s, n]
    (the attention probabilities on the compressed entries summed over each TP rank's heads, ranks in
    order, T = 1 without TP; any split of the heads into groups along dim 1 works; detached here),
    visible [s, n] bool -> scalar fp32, the same on every TP rank."""
    mask = visible[:, None, :]  # [s, 1, n]
    target = entry_probs.detach().float().sum(dim=1).permute(1, 0, 2)  # [s, b, n]
    target = torch.where(mask, target, 0.0)
    target = target / target.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    # invisible entries at the most negative finite score: exp() underflows to 0, no inf * 0 NaNs
    log_q = scores.float().masked_fill(~mask, torch.finfo(torch.float32).min).log_softmax(dim=-1)
    per_query = (torch.special.xlogy(target, target) - target * log_q).sum(dim=-1)  # [s, b]
    seen = visible.any(dim=-1)[:, None].expand_as(per_query)  # queries with >= 1 visible entry
    return (per_query * seen).sum() / seen.sum().clamp_min(1)


def attention_modules(chunks: Iterable[torch.nn.Module]) -> list:
    """Every DeepSeek-V4 attention module in these model chunks (any wrapper around them). The
    training loop collects them once (dsv4cli.train.step) and passes the list below."""
    from dsv4cli.model.dsv4.attention import Dsv4Attention

    return [m for c in chunks for m in c.modules() if isinstance(m, Dsv4Attention)]


def indexer_parameters(attention: Iterable[torch.nn.Module]) -> list:
    """The lightning indexers' parameters (their compressors' included) of these attention modules."""
    return [p for m in attention if m.indexer is not None for p in m.indexer.parameters()]


def set_iteration(attention: Iterable[torch.nn.Module], iteration: Optional[int]) -> None:
    """Tell these DSv4 attention modules (`attention_modules`) which training iteration (0-based) runs
    next (None: none, e.g. inference: sparse attention)."""
    for m in attention:
        m.iteration = iteration


def take_indexer_losses(attention: Iterable[torch.nn.Module]) -> tuple[float, int]:
    """(sum over these attention modules' csa layers of the layer's mean loss over its micro-batches,
    layer count); clears the layers' accumulators."""
    total, layers = 0.0, 0
    for m in attention:
        if m.indexer_loss_count:
            total += float(m.indexer_loss_sum) / m.indexer_loss_count
            layers += 1
        m.indexer_loss_sum, m.indexer_loss_count = 0.0, 0
    return total, layers
