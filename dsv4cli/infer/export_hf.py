"""`dsv4 export-hf`: a dsv4 checkpoint -> a directory `DeepseekV4ForCausalLM.from_pretrained` loads
(docs/interop.md). The inverse of import_hf.py, through the same name table (hf_names.py).

    CKPT (run root -> latest, or an iter_* directory)   read only: dsv4_spec.toml, the model weights,
                                                        hf_config.json (kept by import-hf) when present
    OUT/config.json, OUT/generation_config.json         hf_config_out.py
    OUT/model.safetensors                               one shard, or
    OUT/model-0000K-of-0000N.safetensors + model.safetensors.index.json

Steps: the spec saved in the checkpoint builds dsv4's model in one process, whose tensors take the
checkpoint's stored dtypes before the weights are loaded (as `dsv4 eval` loads them), so nothing is
cast on the way; every model tensor gets its HF name(s) by running the import table backwards
(`hf_pieces`); shards are filled tensor by tensor (a tensor is a view of the model's, or for the
[3] mHC scales a concatenation) and each is written once full; all of it in a hidden directory next
to OUT, renamed to OUT at the end.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from dsv4cli.ckpt.atomic import is_unusable_output
from dsv4cli.ckpt.keys import EMBEDDING_KEY
from dsv4cli.infer.import_hf import DTYPE_NAMES, SOURCE_CONFIG
from dsv4cli.infer.hf_names import MODEL_PREFIX, TOP_LEVEL, layer_table, placements
from dsv4cli.infer.safetensors_io import INDEX_FILE

UNPREFIXED = ("head.weight",)
"""Names transformers writes without the `model.` prefix (its lm_head sits outside the model)."""
DEFAULT_SHARD = 5 * 1000**3
STACKED_EXPERTS = re.compile(r"\.local_experts\.\d+\.")
"""A SequentialMLP expert's state name -> its checkpoint key: `mlp.experts.local_experts.E.linear_fc1.weight`
is stored stacked over experts as `mlp.experts.experts.linear_fc1.weight`."""


class ExportHFError(ValueError):
    """Bad input to export-hf (exit 2): no checkpoint, an OUT in the way, a model HF cannot hold."""


@dataclass(frozen=True)
class Piece:
    """One dsv4 tensor's share of an HF tensor: `target` (dsv4 name), `part` ("all", "rows",
    "gate", "up") and `element` (its index in a [3] mHC scale, else None)."""

    target: str
    part: str
    element: Optional[int]


def hf_pieces(state_names, num_layers: int, num_experts: int) -> dict[str, list[Piece]]:
    """Every HF name of the model whose tensors are `state_names` -> the pieces it is made of.

    Runs the import table backwards: each HF name the table knows for these layers and experts
    (the first spelling of each top-level tensor, which is transformers') whose targets the model
    has. ExportHFError naming a model tensor that no HF name covers (e.g. MTP layers)."""
    have = set(state_names)
    table = layer_table()
    first: dict[tuple, str] = {}
    for name, places in TOP_LEVEL.items():
        first.setdefault(tuple(p.targets for p in places), name)
    candidates = list(first.values())
    for i in range(num_layers):
        candidates += [f"layers.{i}.{k}" for k in table]
        candidates += [f"layers.{i}.ffn.experts.{e}.{w}.weight" for e in range(num_experts) for w in ("w1", "w2", "w3")]
    out: dict[str, list[Piece]] = {}
    for short in candidates:
        found = [(next((t for t in p.targets if t in have), None), p) for p in placements(short, table)]
        if all(t is not None for t, _ in found):
            name = short if short in UNPREFIXED else MODEL_PREFIX + short
            out[name] = [Piece(t, p.part, p.element) for t, p in found]
    missing = sorted(have - {p.target for pieces in out.values() for p in pieces})
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ExportHFError(f"no HF tensor name for {missing[0]}{more}: the hf layout cannot hold it"
                            + (" (HF's DeepseekV4ForCausalLM has no MTP layers)" if "mtp" in missing[0] else ""))
    return out


def hf_tensor(state: dict, pieces: list[Piece], vocab: int, cast=None, keep_fp32: bool = False):
    """The HF tensor made of `pieces` of the model's `state` (CPU, contiguous): the first `vocab`
    rows of a padded table, one half of a fused [gate; up] fc1, or the [3] mHC scale rebuilt from
    its elements. `cast`: a torch dtype for floating tensors (not when `keep_fp32`)."""
    import torch

    if pieces[0].element is not None:
        value = torch.cat([state[p.target].detach().reshape(1) for p in sorted(pieces, key=lambda p: p.element)])
    else:
        p, whole = pieces[0], state[pieces[0].target].detach()
        half = whole.shape[0] // 2
        value = {"rows": whole[:vocab], "gate": whole[:half], "up": whole[half:2 * half]}.get(p.part, whole)
    if cast is not None and value.is_floating_point() and not keep_fp32:
        value = value.to(cast)
    return value.to("cpu").contiguous()


def shard_plan(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Names in order -> shards, as transformers cuts them: a new shard when the next tensor would
    take the current one past max_bytes (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file(k: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def _check_paths(ckpt: Path, out: Path) -> None:
    if not ckpt.exists():
        raise ExportHFError(f"{ckpt}: no such checkpoint")
    if is_unusable_output(out):
        raise ExportHFError(f"{out} exists and is not an empty directory")
    src, dst = ckpt.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ExportHFError(f"{out} and {ckpt} overlap: the checkpoint is never written to")


def source_config(info) -> list[Path]:
    """Where the config.json the model was imported from is kept (import-hf's hf_config.json): the
    checkpoint's iter dir or root, else the root of the checkpoint its spec's checkpoint.load names
    (a fine-tune of an imported checkpoint). -> [path] or []."""
    from dsv4cli.ckpt.errors import CheckpointError
    from dsv4cli.ckpt.layout import resolve_checkpoint

    places = [info.iter_dir, info.location.root]
    load = info.spec.checkpoint.load
    if load:
        try:
            loc = resolve_checkpoint(load)
            places += [loc.iter_dir, loc.root]
        except CheckpointError:
            pass
    return [d / SOURCE_CONFIG for d in places if d is not None and (d / SOURCE_CONFIG).is_file()][:1]


def _load_model(iter_dir: Path, spec, stored: dict, cast=None):
    """The spec's model with the checkpoint's weights, each tensor in its stored dtype (`stored`:
    checkpoint key -> dtype name; others in the word embeddings' dtype). -> (state dict, the names
    of the tensors the model keeps fp32 when cast to `cast`)."""
    import torch

    from dsv4cli.build.parallel import build_model_chunks
    from dsv4cli.ckpt.conformance import check_tensors, expected_shapes
    from dsv4cli.ckpt.load import load_model_weights
    from dsv4cli.infer.generate import checkpoint_dtype
    from dsv4cli.spec.layout import single_process_spec

    chunks = build_model_chunks(single_process_spec(spec))
    check_tensors(iter_dir, expected_shapes(chunks))
    kept: set[str] = set()
    if cast is not None:  # which tensors the model keeps fp32 when cast (model/fp32_params.py)
        chunks[0].to(cast)
        kept = {k for k, v in chunks[0].state_dict().items() if isinstance(v, torch.Tensor) and v.dtype == torch.float32}
    chunks[0].to(checkpoint_dtype(iter_dir))
    state = {k: v for k, v in chunks[0].state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    for name, tensor in state.items():
        kind = stored.get(name) or stored.get(STACKED_EXPERTS.sub(".experts.", name))
        if kind is not None:
            tensor.data = torch.empty(tensor.shape, dtype=getattr(torch, kind), device=tensor.device)
    load_model_weights(iter_dir, chunks)
    return state, kept


def export_hf(ckpt: str | Path, out: str | Path, dtype: Optional[str] = None, max_shard_bytes: int = DEFAULT_SHARD,
              progress: Optional[Callable[[int, int, int, int], None]] = None) -> dict:
    """Export; -> {"out", "checkpoint", "tensors", "bytes", "shards", "dtypes", "config_source"}.

    `dtype`: a key of DTYPE_NAMES ("bf16", "float32", ...) casts floating tensors except those the
    model keeps fp32 (mHC, sinks, position biases, the router bias, ...: model/fp32_params.py), as
    import-hf --dtype does
    (default: each tensor keeps its stored dtype). `progress(bytes, tensors, total bytes, total
    tensors)` is called after each tensor is placed in a shard.
    ExportHFError / CheckpointError for bad input."""
    import torch
    from safetensors.torch import save_file

    from dsv4cli.build.parallel import single_process
    from dsv4cli.ckpt.atomic import new_directory
    from dsv4cli.ckpt.integrity import check_integrity
    from dsv4cli.ckpt.metadata import dtype_name, read_checkpoint_info
    from dsv4cli.infer.hf_config import HFConfigError, read_json
    from dsv4cli.infer.hf_config_out import config_from_spec, generation_config

    ckpt, out = Path(ckpt), Path(out)
    _check_paths(ckpt, out)
    info = read_checkpoint_info(ckpt)
    if info.spec is None:
        raise ExportHFError(f"{info.iter_dir}: no readable dsv4_spec.toml ({info.spec_error or 'missing'})")
    spec, iter_dir = info.spec, info.iter_dir
    check_integrity(iter_dir, loading=True)
    kept = source_config(info)
    try:
        source = read_json(kept[0]) if kept else None
        cast = getattr(torch, DTYPE_NAMES[dtype]) if dtype else None
        stored = {n: e.dtype for n, e in info.tensors.items()}
        config = config_from_spec(spec, DTYPE_NAMES[dtype] if dtype else stored.get(EMBEDDING_KEY, "float32"),
                                  source)
    except HFConfigError as e:
        raise ExportHFError(str(e)) from None
    with new_directory(out) as tmp:
        with single_process(spec, seed=0), torch.no_grad():
            state, fp32_kept = _load_model(iter_dir, spec, stored, cast)
            m = spec.model
            pieces = hf_pieces(state, m.num_layers, m.moe.num_experts if m.moe else 0)
            shapes = {n: _shape(state, p, m.vocab_size) for n, p in pieces.items()}
            keep = {n: any(p.target in fp32_kept for p in ps) for n, ps in pieces.items()}
            size_of = {n: math.prod(shapes[n]) * _itemsize(state[p[0].target], cast, keep[n]) for n, p in pieces.items()}
            shards = shard_plan(size_of, max_shard_bytes)
            total_bytes = sum(size_of.values())
            weight_map, done, counted = {}, [0, 0], Counter()
            for k, names in enumerate(shards):
                tensors = {}
                for name in names:
                    tensors[name] = hf_tensor(state, pieces[name], m.vocab_size, cast, keep[name])
                    counted[dtype_name(tensors[name].dtype)] += 1
                    weight_map[name] = shard_file(k, len(shards))
                    done[0] += size_of[name]
                    done[1] += 1
                    if progress is not None:
                        progress(done[0], done[1], total_bytes, len(pieces))
                save_file(tensors, str(tmp / shard_file(k, len(shards))), metadata={"format": "pt"})
                del tensors
        if len(shards) > 1:
            params = sum(math.prod(shapes[n]) for n, p in pieces.items()
                         if isinstance(state[p[0].target], torch.nn.Parameter))  # as HF counts: no buffers
            index = {"metadata": {"total_parameters": params,
                                  "total_size": total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = generation_config(config)
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    return {"out": str(out), "checkpoint": str(iter_dir), "tensors": len(pieces), "bytes": total_bytes,
            "shards": len(shards), "dtypes": dict(counted), "config_source": str(kept[0]) if kept else None}


def _shape(state: dict, pieces: list[Piece], vocab: int) -> tuple:
    if pieces[0].element is not None:
        return (len(pieces),)
    shape = tuple(state[pieces[0].target].shape)
    if pieces[0].part == "rows":
        return (min(vocab, shape[0]), *shape[1:])
    if pieces[0].part in ("gate", "up"):
        return (shape[0] // 2, *shape[1:])
    return shape


def _itemsize(tensor, cast, keep_fp32: bool) -> int:
    if cast is not None and tensor.is_floating_point() and not keep_fp32:
        return cast.itemsize
    return tensor.element_size()
