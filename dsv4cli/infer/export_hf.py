"""`dsv4 export-hf`: a dsv4 checkpoint -> a directory `DeepseekV4ForCausalLM.from_pretrained` loads, in
transformers' layout or the public release's (docs/interop.md). The inverse of import_hf.py, through
the same name table (hf_names.py).

    CKPT (run root -> latest, or an iter_* directory)   read only: dsv4_spec.toml, the model weights,
                                                        hf_config.json (kept by import-hf) when present
    OUT/config.json, OUT/generation_config.json         hf_config_out.py
    OUT/model.safetensors                               one shard, or
    OUT/model-0000K-of-0000N.safetensors + model.safetensors.index.json

Steps, streaming (one exported tensor in memory at a time): the spec saved in the checkpoint builds
dsv4's model on the meta device (names, which tensors the model keeps fp32, parameters vs buffers:
no memory), checked against the checkpoint's metadata; every model tensor gets its exported name(s)
by running the import table backwards (`hf_pieces`); the names, dtypes and shapes of every exported
tensor are planned from the metadata alone and cut into shards; each shard's header is written
first, then each tensor is read from the checkpoint (only the region it needs: one expert of a
stacked expert weight, one half of a fused fc1, the real vocabulary rows; region_reader.py), cast or
re-quantized to FP8 (dequant.quantize_fp8) and appended. All of it in a hidden directory next to
OUT, renamed to OUT at the end.
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
from dsv4cli.infer.dequant import DEFAULT_BLOCK
from dsv4cli.infer.hf_names import export_names, layer_table, layout_name, part_rows, placements
from dsv4cli.infer.import_hf import DTYPE_NAMES, SOURCE_CONFIG
from dsv4cli.infer.safetensors_io import INDEX_FILE

LAYOUTS = ("hf", "original")
FP8 = "fp8"
"""export_hf's `dtype` for FP8 e4m3 linear weights with 128 x 128 block scales (the rest as for bf16)."""
DEFAULT_SHARD = 5 * 1000**3
STACKED_EXPERTS = re.compile(r"\.local_experts\.(\d+)\.")
"""A SequentialMLP expert's state name -> its checkpoint key: `mlp.experts.local_experts.E.linear_fc1.weight`
is stored stacked over experts as `mlp.experts.experts.linear_fc1.weight` [experts, ...]."""
FP8_WEIGHTS = re.compile(r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|shared_experts\.w[123]"
                         r"|experts\.\d+\.w[123]|e_proj|h_proj)\.weight$")
"""The linear weights an fp8 export quantizes (as the release stores them): attention projections, the
indexer's query projection, shared and routed experts, MTP projections. Not quantized (bf16, as the
release and transformers' `_keep_in_fp32_modules` have them): embeddings, head, routers, compressor
projections, the indexer's weights projection."""
SCALE_SUFFIX = {"hf": ".weight_scale_inv", "original": ".scale"}
FLOATING = ("float64", "float32", "float16", "bfloat16")


class ExportHFError(ValueError):
    """Bad input to export-hf (exit 2): no checkpoint, an OUT in the way, a model the layout cannot hold."""


@dataclass(frozen=True)
class Piece:
    """One dsv4 tensor's share of an exported tensor: `target` (dsv4 name), `part` ("all", "rows",
    "gate", "up") and `element` (its index in a [3] mHC scale, else None)."""

    target: str
    part: str
    element: Optional[int]


@dataclass(frozen=True)
class Planned:
    """One tensor of the export: its name, the pieces it is read from (none for an FP8 scale, made
    with its weight), its shape and dtype (torch's name) as written, and whether it is FP8-quantized
    (its scale is then the next Planned, named `scale`)."""

    name: str
    pieces: tuple
    shape: tuple
    dtype: str
    scale: Optional[str] = None


def hf_pieces(state_names, num_layers: int, num_experts: int, mtp_depth: int = 0,
              layout: str = "hf") -> dict[str, list[Piece]]:
    """Every exported name of the model whose tensors are `state_names` -> the pieces it is made of.

    Runs the import table backwards: each name the table knows for these layers, experts and MTP
    depths (top-level tensors in the layout's spelling, hf_names.EXPORT_TOP) whose targets the model
    has. ExportHFError naming a model tensor that no exported name covers."""
    have = set(state_names)
    table = layer_table()
    out: dict[str, list[Piece]] = {}
    for short in export_names(num_layers, num_experts, mtp_depth, layout):
        found = [(next((t for t in p.targets if t in have), None), p) for p in placements(short, table)]
        if all(t is not None for t, _ in found):
            out[layout_name(short, layout)] = [Piece(t, p.part, p.element) for t, p in found]
    missing = sorted(have - {p.target for pieces in out.values() for p in pieces})
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ExportHFError(f"no {layout}-layout tensor name for {missing[0]}{more}")
    return out


def stored_region(piece: Piece, tensors: dict, vocab: int):
    """Where a piece is stored -> (TensorEntry, offsets, sizes, shape of the piece): the first `vocab`
    rows of a padded table, one half of a fused [gate; up] fc1, one expert of a stacked expert
    weight (leading dimension), or the whole tensor."""
    key, lead = piece.target, ()
    m = STACKED_EXPERTS.search(key)
    if key not in tensors and m:
        key, lead = STACKED_EXPERTS.sub(".experts.", key), (int(m.group(1)),)
    entry = tensors.get(key)
    if entry is None or len(entry.shape) <= len(lead):
        raise ExportHFError(f"the checkpoint has no tensor {key} (for {piece.target})")
    rows = entry.shape[len(lead)]
    start, count = part_rows(piece.part, rows, vocab)
    return entry, lead + (start,), (1,) * len(lead) + (count,), (count, *entry.shape[len(lead) + 1:])


def plan_export(pieces: dict[str, list[Piece]], tensors: dict, vocab: int, kept: set, cast: Optional[str],
                layout: str = "hf", block: tuple[int, int] = DEFAULT_BLOCK) -> list[Planned]:
    """Names, shapes and dtypes of every exported tensor, from the checkpoint's metadata alone.

    Each tensor keeps its stored dtype; `cast` (torch's name, or FP8) casts floating tensors except
    those the model keeps fp32 (`kept`: import_hf.kept_fp32 of the model); FP8 casts to bf16 and
    quantizes FP8_WEIGHTS to e4m3, each followed by its fp32 inverse-scale grid. Integers never change."""
    out = []
    for name, ps in pieces.items():
        regions = [stored_region(p, tensors, vocab) for p in ps]
        stored = regions[0][0].dtype
        shape = (len(ps),) if ps[0].element is not None else regions[0][3]
        keep = cast is None or stored not in FLOATING or any(p.target in kept for p in ps)
        dtype = stored if keep else "bfloat16" if cast == FP8 else cast
        if cast == FP8 and not keep and FP8_WEIGHTS.search(name) and len(shape) == 2:
            scale = name[: -len(".weight")] + SCALE_SUFFIX[layout]
            out.append(Planned(name, tuple(ps), shape, "float8_e4m3fn", scale))
            out.append(Planned(scale, (), tuple(math.ceil(s / b) for s, b in zip(shape, block)), "float32"))
        else:
            out.append(Planned(name, tuple(ps), shape, dtype))
    return out


def read_tensor(item: Planned, reader, tensors: dict, vocab: int):
    """The tensor of a planned item (not a scale), in its stored dtype: its pieces read from the
    checkpoint, the [3] mHC scale rebuilt from its elements."""
    import torch

    values = []
    for p in sorted(item.pieces, key=lambda p: p.element or 0):
        entry, offsets, sizes, shape = stored_region(p, tensors, vocab)
        values.append(reader.read(entry, offsets, sizes).reshape(shape))
    if item.pieces[0].element is not None:
        return torch.cat([v.reshape(1) for v in values])
    return values[0]


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


def model_names(spec, iter_dir: Path) -> tuple[list[str], set[str], set[str]]:
    """The spec's model built on the meta device (no memory), checked against the checkpoint's
    tensors -> (its state names, those it keeps fp32 under any cast, its parameters' names)."""
    import torch

    from dsv4cli.build.model_summary import meta_model
    from dsv4cli.build.parallel import single_process
    from dsv4cli.ckpt.conformance import check_tensors, expected_shapes
    from dsv4cli.infer.import_hf import kept_fp32

    with single_process(spec, seed=0):
        model = meta_model(spec)
        check_tensors(iter_dir, expected_shapes([model]))
        state = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
        return list(state), kept_fp32(model, state), {k for k, _ in model.named_parameters()}


def export_hf(ckpt: str | Path, out: str | Path, dtype: Optional[str] = None, max_shard_bytes: int = DEFAULT_SHARD,
              progress: Optional[Callable[[int, int, int, int], None]] = None, layout: str = "hf",
              fp8_block: tuple[int, int] = DEFAULT_BLOCK) -> dict:
    """Export; -> {"out", "checkpoint", "layout", "tensors", "bytes", "shards", "dtypes", "quantized",
    "config_source"}.

    `dtype`: a key of DTYPE_NAMES ("bf16", "float32", ...) casts floating tensors except those the
    model keeps fp32 (mHC, sinks, position biases, the router bias, the attention's norms:
    import_hf.kept_fp32), as import-hf --dtype does; FP8 ("fp8") quantizes the linear weights
    (FP8_WEIGHTS, blocks of `fp8_block`) and casts the rest as bf16 does (default: each tensor keeps
    its stored dtype). `layout`: "hf" (transformers' save_pretrained) or "original" (the release).
    `progress(bytes, tensors, total bytes, total tensors)` is called after each tensor is written.
    ExportHFError / CheckpointError for bad input."""
    from dsv4cli.ckpt.atomic import new_directory
    from dsv4cli.ckpt.integrity import check_integrity
    from dsv4cli.ckpt.metadata import read_checkpoint_info
    from dsv4cli.infer.hf_config import HFConfigError, read_json
    from dsv4cli.infer.hf_config_out import FP8_QUANTIZATION, export_config, generation_config
    from dsv4cli.infer.region_reader import RegionReader

    if layout not in LAYOUTS:
        raise ExportHFError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    ckpt, out = Path(ckpt), Path(out)
    _check_paths(ckpt, out)
    info = read_checkpoint_info(ckpt)
    if info.spec is None:
        raise ExportHFError(f"{info.iter_dir}: no readable dsv4_spec.toml ({info.spec_error or 'missing'})")
    spec, iter_dir, tensors = info.spec, info.iter_dir, info.tensors
    check_integrity(iter_dir, loading=True)
    kept_config = source_config(info)
    cast = dtype if dtype == FP8 else DTYPE_NAMES[dtype] if dtype else None
    try:
        source = read_json(kept_config[0]) if kept_config else None
        quantization = {**FP8_QUANTIZATION, "weight_block_size": list(fp8_block)} if cast == FP8 else None
        stored = tensors[EMBEDDING_KEY].dtype if EMBEDDING_KEY in tensors else "float32"
        named_dtype = "bfloat16" if cast == FP8 else cast or stored
        config = export_config(spec, named_dtype, source, layout, quantization)
    except HFConfigError as e:
        raise ExportHFError(str(e)) from None
    names, kept, params = model_names(spec, iter_dir)
    m = spec.model
    pieces = hf_pieces(names, m.num_layers, m.moe.num_experts if m.moe else 0, m.mtp.depth, layout)
    plan = plan_export(pieces, tensors, m.vocab_size, kept, cast, layout, fp8_block)
    reader = RegionReader(iter_dir, info.dcp_metadata)
    with new_directory(out) as tmp:
        counted, total_bytes, shards = _write_shards(tmp, plan, reader, tensors, m.vocab_size, max_shard_bytes,
                                                     params, fp8_block, progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation = generation_config(config)
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    return {"out": str(out), "checkpoint": str(iter_dir), "layout": layout, "tensors": len(plan), "bytes": total_bytes,
            "shards": shards, "dtypes": dict(counted), "quantized": sum(p.scale is not None for p in plan),
            "config_source": str(kept_config[0]) if kept_config else None}


def _write_shards(tmp: Path, plan: list[Planned], reader, tensors: dict, vocab: int, max_bytes: int,
                  params: set, block: tuple[int, int], progress) -> tuple[Counter, int, int]:
    """Write the planned tensors into shards of at most max_bytes (+ the index when more than one),
    one tensor in memory at a time (an FP8 weight and its scale: both). -> (dtype counts, bytes, shards)."""
    import torch

    from dsv4cli.infer.dequant import quantize_fp8
    from dsv4cli.infer.safetensors_io import ShardWriter

    size_of = {p.name: math.prod(p.shape) * torch.empty((), dtype=getattr(torch, p.dtype)).element_size() for p in plan}
    shards = shard_plan(size_of, max_bytes)
    total, by_name = sum(size_of.values()), {p.name: p for p in plan}
    weight_map, done, counted, pending = {}, [0, 0], Counter(), {}
    for k, names in enumerate(shards):
        file = shard_file(k, len(shards))
        with ShardWriter(tmp / file, {n: (by_name[n].dtype, by_name[n].shape) for n in names}) as writer:
            for name in names:
                item = by_name[name]
                if name not in pending:  # (an FP8 scale is made with its weight)
                    value = read_tensor(item, reader, tensors, vocab)
                    if item.scale is not None:
                        pending[name], pending[item.scale] = quantize_fp8(value, block)
                    else:
                        pending[name] = value.to(getattr(torch, item.dtype))
                writer.write(name, pending.pop(name))
                counted[item.dtype] += 1
                weight_map[name] = file
                done[0] += size_of[name]
                done[1] += 1
                if progress is not None:
                    progress(done[0], done[1], total, len(plan))
    if len(shards) > 1:
        count = sum(math.prod(p.shape) for p in plan if p.pieces and p.pieces[0].target in params)  # as HF: no buffers
        index = {"metadata": {"total_parameters": count, "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return counted, total, len(shards)
