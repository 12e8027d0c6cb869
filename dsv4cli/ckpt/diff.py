"""Compare two checkpoints: keys only in one, shape/dtype changes, max |A - B| per common tensor (streamed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dsv4cli.ckpt.errors import CheckpointError
from dsv4cli.ckpt.metadata import read_checkpoint_info
from dsv4cli.ckpt.tensors import TensorReader


@dataclass
class CheckpointDiff:
    a: str
    b: str
    only_in_a: list[dict] = field(default_factory=list)
    only_in_b: list[dict] = field(default_factory=list)
    changed: list[dict] = field(default_factory=list)  # shape or dtype differs
    compared: list[dict] = field(default_factory=list)  # {name, max_abs_diff, identical}
    unreadable: list[dict] = field(default_factory=list)  # {name, error}: bytes that could not be read
    identical: int = 0
    different: int = 0
    max_abs_diff: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def _entry(e) -> dict:
    return {"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "bytes": e.bytes}


def diff_checkpoints(a: str | Path, b: str | Path) -> CheckpointDiff:
    """Metadata diff plus a streamed value comparison of every tensor both hold with equal shape and dtype.

    Raises CheckpointError when either side is unreadable or truncated; tensors whose bytes cannot be
    read are listed in `unreadable` (the CLI then exits 2 after printing the rest).
    """
    import torch

    ia, ib = read_checkpoint_info(a), read_checkpoint_info(b)
    for info in (ia, ib):
        if info.integrity_problems:
            raise CheckpointError(f"{info.iter_dir}: corrupt checkpoint: " + "; ".join(info.integrity_problems))
    out = CheckpointDiff(str(ia.iter_dir), str(ib.iter_dir))
    ta, tb = ia.tensors, ib.tensors
    out.only_in_a = [_entry(ta[k]) for k in sorted(ta.keys() - tb.keys())]
    out.only_in_b = [_entry(tb[k]) for k in sorted(tb.keys() - ta.keys())]
    ra, rb = TensorReader(ia.iter_dir, ia.dcp_metadata), TensorReader(ib.iter_dir, ib.dcp_metadata)
    for k in sorted(ta.keys() & tb.keys()):
        ea, eb = ta[k], tb[k]
        if ea.shape != eb.shape or ea.dtype != eb.dtype:
            out.changed.append({"name": k, "a": {"shape": list(ea.shape), "dtype": ea.dtype},
                                "b": {"shape": list(eb.shape), "dtype": eb.dtype}})
            continue
        try:
            xa, xb = ra.load(ea), rb.load(eb)
        except CheckpointError as e:  # keep going: report every unreadable tensor, the caller exits 2
            out.unreadable.append({"name": k, "error": str(e)})
            continue
        same = bool(torch.equal(xa, xb)) or (xa.is_floating_point() and bool(torch.equal(xa.isnan(), xb.isnan())) and
                                             bool(torch.equal(xa.nan_to_num(0), xb.nan_to_num(0))))
        d = 0.0 if same else float((xa.to(torch.float64) - xb.to(torch.float64)).abs().nan_to_num(float("inf")).max())
        out.compared.append({"name": k, "max_abs_diff": d, "identical": same})
        out.identical += same
        out.different += not same
        out.max_abs_diff = max(out.max_abs_diff, d)
        del xa, xb
    return out
