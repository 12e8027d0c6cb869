"""Checkpoint key patterns (docs/design.md §2.5): mHC tensors, contraction heads, MTP depths, optimizer state.

Megatron stores homogeneous decoder layers stacked (`decoder.layers.<rest>` with a leading layer
dim); heterogeneous ones per layer (`decoder.layers.{i}.<rest>`). MTP depths are always per
depth (`mtp.layers.{k}.`).

Optimizer state, as megatron-core 0.16 writes it (every form below may carry a `chained_{i}.`
prefix: the ChainedOptimizer of MoE models, dense + expert groups, adds it unless told
`chained_optim_avoid_prefix`):
- per parameter, `optimizer.state.<state>.<parameter key>`: the non-distributed optimizer
  (exp_avg, exp_avg_sq, fp32_param with bf16) and the distributed optimizer's
  `fully_reshardable` (+ `param`) and `fully_sharded_model_space` (+ `fp32_param`; stored as
  flattened ranges of the parameter) formats;
- per data-parallel group, `optimizer.distributed.dp_group_idx_<g>.<...>`: the distributed
  optimizer's bucket-space formats (`dp_reshardable`: `gbuf_idx_*.dtype_*.bucket_idx_*.<state>`
  tensors + `per_bucket_numel*` objects; `dp_zero_gather_scatter`: one `param_state` object)
  and the non-reshardable formats' param groups.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from dsv4cli.ckpt.errors import CheckpointError

HC_HEAD_NAMES = ("hc_head_fn", "hc_head_base", "hc_head_scale")
MAIN_BLOCK = "decoder."
MAPPING_PROJ_SUFFIX = "_hyper_connection.mapping_proj.weight"
EMBEDDING_KEY = "embedding.word_embeddings.weight"
OPTIMIZER_STATE_PREFIX = "optimizer.state."
_MTP_RE = re.compile(r"^mtp\.layers\.(\d+)\.")
_CHAINED = r"(?:chained_\d+\.)?"
_OPT_RE = re.compile(rf"^({_CHAINED})optimizer\.state\.([^.]+)\.(.+)$")
_OPT_OWNER_RE = re.compile(rf"^{_CHAINED}optimizer\.")


def is_optimizer_key(name: str) -> bool:
    """Is this stored name (tensor key or DCP object name) optimizer state, of any format above?

    The one definition every tool uses.
    """
    return _OPT_OWNER_RE.match(name) is not None


@dataclass(frozen=True)
class OptimizerKey:
    """A per-parameter optimizer key: `{prefix}optimizer.state.{state}.{param}`."""

    prefix: str  # "" or "chained_{i}."
    state: str  # exp_avg, exp_avg_sq, fp32_param, param
    param: str  # the model tensor's key

    @property
    def name(self) -> str:
        return f"{self.prefix}{OPTIMIZER_STATE_PREFIX}{self.state}.{self.param}"


def parse_optimizer_key(name: str) -> Optional[OptimizerKey]:
    """'chained_0.optimizer.state.exp_avg.decoder.hc_head_fn' -> OptimizerKey('chained_0.', 'exp_avg', ...);
    None for model keys and the distributed optimizer's bucket-space keys."""
    m = _OPT_RE.match(name)
    return OptimizerKey(m.group(1), m.group(2), m.group(3)) if m else None


def mtp_depths(names: Iterable[str]) -> list[int]:
    """0-based MTP depths present in the key space."""
    return sorted({int(m.group(1)) for n in names if (m := _MTP_RE.match(n))})


def contraction_blocks(names: Iterable[str]) -> list[str]:
    """Key prefixes of every block with an output contraction: 'decoder.' and 'mtp.layers.{k}.'."""
    names = list(names)
    return [MAIN_BLOCK] + [f"mtp.layers.{k}." for k in mtp_depths(names)]


def hc_head_keys(block: str) -> list[str]:
    return [block + n for n in HC_HEAD_NAMES]


def mapping_proj_keys(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if n.endswith(MAPPING_PROJ_SUFFIX) and not is_optimizer_key(n))


def split_optimizer_key(name: str) -> Optional[tuple[str, str]]:
    """'[chained_0.]optimizer.state.exp_avg.decoder.hc_head_fn' -> ('exp_avg', 'decoder.hc_head_fn'); else None."""
    k = parse_optimizer_key(name)
    return (k.state, k.param) if k else None


def streams_from_rows(rows: int) -> Optional[int]:
    """n from the n*n + 2n rows of a mapping projection, None when no integer n fits."""
    n = math.isqrt(rows + 1) - 1
    return n if n >= 1 and n * n + 2 * n == rows else None


@dataclass(frozen=True)
class StreamLayout:
    """Stream count n and hidden size h as the stored tensors show them, with the evidence."""

    streams: int
    hidden: int
    evidence: str


def infer_stream_layout(shapes: Mapping[str, tuple[int, ...]]) -> Optional[StreamLayout]:
    """n and h from every stored mapping_proj ([..., n*n+2n, n*h]); None without mHC tensors.

    Raises CheckpointError when the shapes do not fit one n and h.
    """
    keys = mapping_proj_keys(shapes)
    if not keys:
        return None
    found: dict[tuple[int, int], str] = {}
    for k in keys:
        shape = shapes[k]
        if len(shape) < 2:
            raise CheckpointError(f"{k}: shape {list(shape)} is not [..., n*n+2n, n*h]")
        rows, cols = shape[-2], shape[-1]
        n = streams_from_rows(rows)
        if n is None or cols % n:
            raise CheckpointError(f"{k}: shape {list(shape)} fits no stream count (rows must be n*n+2n, cols n*h)")
        found.setdefault((n, cols // n), f"{k} {list(shape)}")
    if len(found) > 1:
        detail = "; ".join(f"n={n}, h={h} from {ev}" for (n, h), ev in found.items())
        raise CheckpointError(f"mapping_proj shapes disagree: {detail}")
    (n, h), ev = next(iter(found.items()))
    emb = shapes.get(EMBEDDING_KEY)
    if emb is not None and len(emb) == 2 and emb[1] != h:
        raise CheckpointError(f"{EMBEDDING_KEY} {list(emb)} has hidden size {emb[1]}, but {ev} gives h = {h}")
    return StreamLayout(n, h, ev)
