"""`dsv4 eval`: load model weights from a checkpoint and compute the held-out loss.

-> {"loss": main cross-entropy, "mtp_losses": [per depth, unscaled], "tokens": tokens evaluated,
    "checkpoint": iter dir, "iteration": N}. Works under any parallel layout (torchrun) because
the torch_dist checkpoint is resharded on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def evaluate(spec, load: str, batches: Optional[int] = None) -> dict:
    """Collective: every rank calls it; all ranks return the same result."""
    from dsv4cli.ckpt.conformance import check_tensors, expected_shapes
    from dsv4cli.ckpt.integrity import check_integrity
    from dsv4cli.ckpt.layout import resolve_checkpoint
    from dsv4cli.ckpt.load import load_model_weights
    from dsv4cli.train.data import build_sources
    from dsv4cli.train.runtime import build_runtime, heldout_loss

    loc = resolve_checkpoint(load)
    iter_dir, iteration = loc.iter_dir, loc.iteration if loc.iteration is not None else 0
    check_integrity(iter_dir, loading=True)  # (`dsv4 eval` checked before starting; this covers the entry point)
    rt = build_runtime(spec, with_optimizer=False)
    check_tensors(iter_dir, expected_shapes(rt.chunks))
    load_model_weights(iter_dir, rt.chunks)
    data = build_sources(spec)
    n = batches or spec.train.eval_batches
    loss, mtp, tokens = heldout_loss(rt, data.valid, n)
    return {"loss": loss, "mtp_losses": mtp, "tokens": tokens, "checkpoint": str(Path(iter_dir)),
            "iteration": iteration}
