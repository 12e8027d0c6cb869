"""Global batches by position: data-parallel rank r of d takes the r-th contiguous slice of each."""

from __future__ import annotations

import numpy as np


def microbatches(source, position: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
                 ) -> list[dict]:
    """This DP rank's micro-batches of the global batch that starts at sample `position`.

    -> [{"tokens", "labels", "loss_mask", "position_ids"}] of numpy arrays [b, s].
    """
    per_rank = global_batch // dp_size
    start = position + dp_rank * per_rank
    out = []
    for m in range(per_rank // micro_batch):
        rows = [source[start + m * micro_batch + j] for j in range(micro_batch)]
        tokens = np.stack([r[0] for r in rows])
        out.append({
            "tokens": tokens,
            "labels": np.stack([r[1] for r in rows]),
            "loss_mask": np.stack([r[2] for r in rows]),
            "position_ids": np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape).copy(),
        })
    return out
