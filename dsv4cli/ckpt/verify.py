"""Checks that a converted checkpoint computes what the legacy one did.

1. Contraction check (always): the stored hc_head_* of every converted block, fed through
   `dsv4cli.kernels.learned_output_contract`, equal the stream average on random inputs.
2. Model check (when a spec is known and both models fit in memory): build the legacy
   (average) and converted (learned) models on CPU, load each checkpoint, run one batch,
   compare logits and loss.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

from dsv4cli.ckpt.keys import contraction_blocks, hc_head_keys
from dsv4cli.ckpt.layout import resolve_checkpoint
from dsv4cli.ckpt.metadata import CheckpointInfo, read_checkpoint_info
from dsv4cli.ckpt.tensors import TensorReader
from dsv4cli.spec.layout import single_process_spec

CONTRACTION_RTOL = 1e-5
LOGIT_RTOL = 1e-5  # of max |logit|: fp32 rounding of pre = 1/n is ~1e-7 relative
LOSS_ATOL = 1e-5


def verify_contraction(converted_dir: str | Path, n: int, hidden: int, eps: float, seed: int = 0) -> dict:
    """max |learned - average| over random [4, 3, n*h] inputs for every block's stored hc_head_*."""
    import torch

    from dsv4cli.kernels import average_output_contract, learned_output_contract

    info = read_checkpoint_info(converted_dir)
    reader = TensorReader(info.iter_dir, info.dcp_metadata)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, n * hidden, generator=gen, dtype=torch.float32)
    ref = average_output_contract(x, n)
    blocks, worst = {}, 0.0
    for block in contraction_blocks(info.tensors):
        fn, base, scale = (reader.load(info.tensors[k]) for k in hc_head_keys(block))
        y = learned_output_contract(x, fn, base, scale, n, eps)
        diff = float((y - ref).abs().max())
        blocks[block.rstrip(".")] = diff
        worst = max(worst, diff)
    tol = CONTRACTION_RTOL * max(1.0, float(x.abs().max()))
    return {"check": "contraction", "max_abs_diff": worst, "per_block": blocks, "tolerance": tol, "ok": worst <= tol}


def _fits_in_memory(info: CheckpointInfo) -> tuple[bool, str]:
    import psutil

    params = sum(t.bytes for t in info.model_tensors().values())
    need = 2 * 3 * params  # two fp32 models, weights + loaded copies + activations headroom
    avail = psutil.virtual_memory().available
    return need < 0.5 * avail, f"needs ~{need / 2**30:.2f} GiB, {avail / 2**30:.2f} GiB available"


def _load_model(spec, iter_dir: Path):
    """Build the spec's model (1-process group must be up) and load a checkpoint's weights into it."""
    from megatron.core import dist_checkpointing

    from dsv4cli.build import build_model

    model = build_model(spec)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict(prefix="")}, str(iter_dir))
    model.load_state_dict(loaded["model"], strict=True)
    return model.eval()


def verify_model_outputs(legacy_dir: Path, converted_dir: Path, legacy_spec, converted_spec, seed: int = 0) -> dict:
    """Logits and loss of one batch through the legacy and the converted checkpoint (CPU, fp32, 1 process)."""
    import torch

    from dsv4cli.build import single_process

    m = legacy_spec.model
    b, s = 2, min(m.seq_length, 32)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.vocab_size, (b, s + 1), generator=gen)
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    pos = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
    out = {}
    with single_process(legacy_spec, seed=seed):
        for tag, spec, d in (("legacy", legacy_spec, legacy_dir), ("converted", converted_spec, converted_dir)):
            model = _load_model(spec, d)
            with torch.no_grad():
                logits = model(tokens, pos, attention_mask=None)
                loss = model(tokens, pos, attention_mask=None, labels=labels)
            out[tag] = (logits.float(), float(loss.float().mean()))
            del model
    logit_diff = float((out["legacy"][0] - out["converted"][0]).abs().max())
    logit_tol = LOGIT_RTOL * max(1.0, float(out["legacy"][0].abs().max()))
    loss_diff = abs(out["legacy"][1] - out["converted"][1])
    return {
        "check": "model",
        "max_abs_logit_diff": logit_diff,
        "loss_legacy": out["legacy"][1],
        "loss_converted": out["converted"][1],
        "loss_diff": loss_diff,
        "tolerance": {"logits": logit_tol, "loss": LOSS_ATOL},
        "ok": logit_diff <= logit_tol and loss_diff <= LOSS_ATOL,
    }


def verify_conversion(src_info: CheckpointInfo, dst: Path, spec: Optional[Any], n: int, hidden: int, eps: float) -> dict:
    """Run every check that applies; -> {'checks': [...], 'skipped': [...], 'ok': bool}."""
    converted = resolve_checkpoint(dst).iter_dir
    checks = [verify_contraction(converted, n, hidden, eps)]
    skipped = []
    if spec is None:
        skipped.append("model: no spec known (none saved; pass --spec to run it)")
    else:
        fits, why = _fits_in_memory(src_info)
        if not fits:
            skipped.append(f"model: too large for this machine's memory ({why})")
        else:
            try:
                import dsv4cli.build as build

                has_builder = hasattr(build, "build_model")
            except ImportError:
                has_builder = False
            if not has_builder:
                skipped.append("model: dsv4cli.build.build_model is not available")
            else:
                legacy_spec = single_process_spec(spec.model_copy(deep=True))
                legacy_spec.model.contraction.mode = "average"
                new_spec = legacy_spec.model_copy(deep=True)
                new_spec.model.contraction.mode = "learned"
                new_spec.model.contraction.eps = eps
                try:
                    with warnings.catch_warnings():  # megatron's import-time notices (no Apex/TE, ...)
                        warnings.simplefilter("ignore")
                        checks.append(verify_model_outputs(src_info.iter_dir, converted, legacy_spec, new_spec))
                except BaseException as e:  # DCP's CheckpointException is a BaseException
                    if isinstance(e, (KeyboardInterrupt, SystemExit)):
                        raise
                    last = (str(e).strip().splitlines() or [""])[-1]
                    if len(last) > 300:  # e.g. a KeyError listing every key of the state dict
                        last = last[:297] + "..."
                    checks.append({"check": "model", "ok": False, "error": f"{type(e).__name__}: {last}"})
    return {"checks": checks, "skipped": skipped, "ok": all(c["ok"] for c in checks)}
