"""`dsv4 import-hf`: a DeepSeek-V4 directory -> a dsv4 checkpoint (model weights only) and the spec of
its model (docs/interop.md). The layout is detected (hf_names.detect_layout): what HF transformers'
`save_pretrained` writes, or the public release's (original names, legacy config keys, `mtp.*`
tensors, FP8 / FP4 weights with their scales: dequantized while streaming, dequant.py).

    HF_DIR/config.json [+ generation_config.json, tokenizer.json]   read (never written)
    HF_DIR/*.safetensors [+ model.safetensors.index.json]          read one tensor at a time
    OUT/latest_checkpointed_iteration.txt, OUT/iter_0000000/       dsv4's torch_dist checkpoint
    OUT/spec.toml (or --spec-out), OUT/tokenizer.json (if HF_DIR has one)
    OUT/hf_config.json                                             HF_DIR/config.json, kept for export-hf

Steps: config.json -> Spec (hf_config.py); every source name -> its place in dsv4's model
(hf_names.py; an unknown name is an error naming it), shapes and coverage checked from the headers
before any data is read; the size of OUT is forecast (forecast_bytes) and checked against the free
space of its filesystem before anything is written; dsv4's model is built from the spec on the meta
device (names, shapes, sharding: no memory) and its tensors given their import dtypes (`place`); the
checkpoint is saved with dsv4's own save, whose writer asks for one tensor at a time: each is made
then from the source tensor(s) that fill it (`target_value`, in its stored dtype or `dtype`),
written and released (stream_save.py). All of it into a hidden directory next to OUT that is renamed
to OUT at the end. Peak memory: about two of the largest tensors above the modules' own.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from dsv4cli.ckpt.atomic import is_unusable_output
from dsv4cli.infer.dequant import DEFAULT_BLOCK, DequantError, block_size, dequantize, fold_scales, grid_block
from dsv4cli.infer.hf_config import HFConfigError, eos_token_ids, notes_on, read_json, spec_data
from dsv4cli.infer.hf_names import (Placement, detect_layout, layer_table, mtp_index, original_name, part_rows,
                                    placements, strip_prefix)
from dsv4cli.infer.safetensors_io import (STORED_BYTES, TORCH_DTYPES, SafetensorsError, SourceTensor, read_scaled,
                                          tensor_sources)
from dsv4cli.infer.toy import ToyError, cut_config, cut_sources

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}
"""--dtype spellings of import-hf and export-hf -> torch's dtype name."""
SPEC_NAME = "spec.toml"
TOKENIZER = "tokenizer.json"
SOURCE_CONFIG = "hf_config.json"
DEQUANTIZED_DEFAULT = "bfloat16"


class ImportHFError(ValueError):
    """Bad input to import-hf (exit 2): a config dsv4 cannot express, an unknown or mis-shaped tensor, ..."""


class ImportHFFailure(RuntimeError):
    """import-hf failed while writing for a reason that is not its input (exit 1): one line."""


@dataclass
class ImportPlan:
    """What an import will do, decided from config.json and the safetensors headers alone."""

    hf_dir: Path
    out: Path
    spec_file: Path
    spec_text: str
    spec: object
    sources: dict[str, SourceTensor]
    tokenizer: Optional[Path]
    notes: list[str] = field(default_factory=list)
    layout: str = "hf"
    mtp_depth: int = 0
    block: tuple[int, int] = DEFAULT_BLOCK


def _relative(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())


def _check_paths(hf_dir: Path, out: Path, spec_file: Path) -> None:
    if not (hf_dir / "config.json").is_file():
        raise ImportHFError(f"{hf_dir}: no config.json (not a saved HF model directory)")
    if is_unusable_output(out):
        raise ImportHFError(f"{out} exists and is not an empty directory")
    src, dst, spec = hf_dir.resolve(), out.resolve(), spec_file.resolve()
    for path in (dst, spec):
        if path == src or src in path.parents:
            raise ImportHFError(f"{path} is inside {hf_dir}: the source directory is never written to")
    if dst in src.parents:
        raise ImportHFError(f"{hf_dir} is inside {out}")


def read_sources(hf_dir: Path, layers: Optional[int] = None,
                 experts: Optional[int] = None) -> tuple[dict, dict[str, SourceTensor], str, list[str]]:
    """config.json and the tensor headers of `hf_dir`, scales folded into their weights and cut to a toy
    variant's first `layers` / `experts`. -> (config, sources, layout, toy notes); ImportHFError when bad."""
    try:
        cfg = read_json(hf_dir / "config.json")
        sources = tensor_sources(hf_dir)
        layout = detect_layout(sources)
        sources = fold_scales(sources)
        toy_notes = []
        if layers is not None or experts is not None:
            cfg, toy_notes = cut_config(cfg, layers, experts)
            sources = cut_sources(sources, cfg["num_hidden_layers"], cfg["n_routed_experts"])
    except (HFConfigError, SafetensorsError, DequantError, ToyError) as e:
        raise ImportHFError(str(e)) from None
    except ValueError as e:  # detect_layout: mixed layouts
        raise ImportHFError(f"{hf_dir}: {e}") from None
    return cfg, sources, layout, toy_notes


def plan_import(hf_dir: str | Path, out: str | Path, spec_out: Optional[str | Path] = None,
                layers: Optional[int] = None, experts: Optional[int] = None) -> ImportPlan:
    """Read config.json and the tensor headers, build the spec, check names. ImportHFError when bad.
    `layers` / `experts`: a toy variant with the first K layers and E experts (toy.py)."""
    from dsv4cli.spec.load import spec_to_toml
    from dsv4cli.spec.schema import Spec

    hf_dir, out = Path(hf_dir), Path(out)
    spec_file = Path(spec_out) if spec_out is not None else out / SPEC_NAME
    _check_paths(hf_dir, out, spec_file)
    cfg, sources, layout, toy_notes = read_sources(hf_dir, layers, experts)
    try:
        generation = read_json(hf_dir / "generation_config.json") if (hf_dir / "generation_config.json").is_file() else None
    except HFConfigError as e:
        raise ImportHFError(str(e)) from None
    mtp = sorted({k for name in sources if (k := mtp_index(name)) is not None})
    if mtp != list(range(len(mtp))):
        raise ImportHFError(f"{hf_dir}: MTP tensors of depths {[k + 1 for k in mtp]} (mtp.K.* with K = {mtp}): "
                            "the depths must be 1..D")
    block = block_size(cfg)
    for source in sources.values():
        if source.scale is None:
            _torch_dtype(source.dtype)
        else:
            check_scale_grid(source, block)
    table = layer_table()
    unknown = [name for name, source in sources.items() if placements(name, table, source.shape) is None]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ImportHFError(f"unknown tensor {unknown[0]} in {sources[unknown[0]].file.name}{more}: "
                            "dsv4 does not know where it goes")
    tokenizer = hf_dir / TOKENIZER if (hf_dir / TOKENIZER).is_file() else None
    tok_value = _relative(out, spec_file.parent) + "/" + TOKENIZER if tokenizer else "byte"
    try:
        data = spec_data(cfg, mtp_depth=len(mtp), eos=eos_token_ids(cfg, generation), name=hf_dir.resolve().name,
                         tokenizer=tok_value, checkpoint_dir=_relative(out, spec_file.parent))
        spec = Spec.model_validate(data, strict=True)
    except HFConfigError as e:
        raise ImportHFError(str(e)) from None
    except ValueError as e:  # pydantic's ValidationError
        raise ImportHFError(f"config.json gives a spec dsv4 rejects: {e}") from None
    header = (f"# Imported by `dsv4 import-hf` from {hf_dir.resolve()}\n"
              + "".join(f"# {note}\n" for note in toy_notes)
              + ("" if tokenizer else "# No tokenizer.json there: data.tokenizer = \"byte\" is a placeholder.\n"))
    return ImportPlan(hf_dir, out, spec_file, header + spec_to_toml(spec), spec, sources, tokenizer,
                      toy_notes + notes_on(cfg),
                      layout, len(mtp), block)


def check_scale_grid(source: SourceTensor, block: tuple[int, int]) -> None:
    """The scale grid of a quantized source fits its weight (headers only, as dequantize will read it:
    the last two dimensions of each). ImportHFError naming both tensors when it does not."""
    grid = tuple(source.scale.shape[-2:]) if len(source.scale.shape) >= 2 else (1, 1)
    try:
        grid_block(tuple(source.shape), grid, block)
    except DequantError as e:
        raise ImportHFError(f"{source.name} (scale {source.scale.name}): {e}") from None


def _torch_dtype(name: str):
    import torch

    if name not in TORCH_DTYPES or name.startswith("F8_"):  # FP8 needs its scale (dequant.py)
        raise ImportHFError(f"stored dtype {name} is not supported without a scale tensor next to it")
    return getattr(torch, TORCH_DTYPES[name])


def _region(target_shape: tuple, placement: Placement, source_shape: tuple) -> tuple[slice, tuple]:
    """-> (the rows of the target a placement writes: slice(None) for all, the shape the source must
    have there)."""
    start, count = part_rows(placement.part, target_shape[0], source_shape[0] if source_shape else None)
    rows = slice(None) if (start, count) == (0, target_shape[0]) else slice(start, start + count)
    return rows, (count, *target_shape[1:])


@dataclass
class Targets:
    """Where every source tensor goes (`place`): the model's tensors by state name (`state`, each
    already of its import dtype, `dtypes`) and, for each, the (source, placement, rows) writing it."""

    state: dict
    dtypes: dict
    parts: dict[str, list[tuple[SourceTensor, Placement, slice]]]


def place(model, sources: dict[str, SourceTensor], dtype=None) -> Targets:
    """Check every source tensor against its place in `model` (headers only) and give each receiving
    parameter or buffer a fresh uninitialised tensor (on the model's device: none on meta) of its
    import dtype: the source's dtype (or `dtype` for floating tensors; a quantized source: `dtype`,
    default bfloat16); fp32 for what the model keeps fp32 (kept_fp32). ImportHFError for a missing
    target, a shape mismatch, or model tensors no source fills."""
    import torch

    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    fp32 = kept_fp32(model, state)
    table = layer_table()
    parts: dict[str, list] = {}
    dtypes: dict[str, object] = {}
    written: dict[str, set] = {}
    for source in sources.values():
        for p in placements(source.name, table, source.shape):
            target = next((t for t in p.targets if t in state), None)
            if target is None:
                raise ImportHFError(f"{source.name}: the model built from config.json has no {p.targets[0]}")
            rows, want = _region(tuple(state[target].shape), p, source.shape)
            got = tuple(source.shape) if p.element is None else (tuple(source.shape[1:]) or (1,))
            if got != want:
                raise ImportHFError(f"{source.name} {list(source.shape)} does not fit {target} "
                                    f"{list(state[target].shape)} ({p.part})")
            if target in fp32:  # the model keeps it fp32 whatever --dtype says
                dtypes[target] = torch.float32
            elif source.scale is not None:
                dtypes[target] = dtype if dtype is not None else getattr(torch, DEQUANTIZED_DEFAULT)
            else:
                stored = _torch_dtype(source.dtype)
                dtypes[target] = dtype if dtype is not None and stored.is_floating_point else stored
            written.setdefault(target, set()).add(p.part if p.element is None else p.element)
            parts.setdefault(target, []).append((source, p, rows))
    missing = sorted(set(state) - set(written))
    halves = sorted(t for t, got in written.items() if got & {"gate", "up"} and got != {"gate", "up"})
    if missing or halves:
        names = missing or halves
        raise ImportHFError(f"no source tensor for {names[0]}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                            + ("" if missing else " (only one of w1 / w3)"))
    for target, kind in dtypes.items():
        state[target].data = torch.empty(state[target].shape, dtype=kind, device=state[target].device)
    return Targets(state, dtypes, parts)


class SourceReader:
    """Reads one source tensor at a time, as it goes in the model: dequantized (`block`: the config's
    block size) into the dtype asked, a toy variant's rows cut, its integer values taken modulo; a
    fused [E, ...] expert tensor one element (`element`) at a time, each read from its own byte range.
    `progress(bytes read, tensors begun, total bytes, total tensors)` after each first read (of a fused
    tensor's element: its share of the bytes)."""

    def __init__(self, sources: list[SourceTensor], block: tuple[int, int] = DEFAULT_BLOCK,
                 progress: Optional[Callable[[int, int, int, int], None]] = None):
        self._block, self._progress = block, progress
        self._total, self._count = sum(map(stored_bytes, sources)), len(sources)
        self._seen: dict[str, set] = {}
        self._done = 0

    def __call__(self, source: SourceTensor, dtype, element: Optional[int] = None):
        tensor, scale = read_scaled(source, element)
        if scale is not None:
            try:
                tensor = dequantize(tensor, scale, dtype, self._block)
            except DequantError as e:
                raise ImportHFError(f"{source.name}: {e}") from None
        if source.rows is not None and element is None:
            tensor = tensor[: source.rows]
        if source.modulo is not None:
            tensor = tensor % source.modulo
        seen = self._seen.setdefault(source.name, set())
        if element not in seen:
            seen.add(element)
            parts = 1 if element is None else source.shape[0]
            self._done += stored_bytes(source) // parts
            if self._progress is not None:
                self._progress(self._done, len(self._seen), self._total, self._count)
        return tensor


def target_value(targets: Targets, name: str, read: SourceReader):
    """The whole value of model tensor `name` in its import dtype: the one source that fills it, or
    zeros of its shape (padding rows stay zero) with every source placed in it, each read when needed
    (a fused expert tensor: only the element placed here)."""
    import torch

    shape, parts = tuple(targets.state[name].shape), targets.parts[name]
    if len(parts) == 1 and parts[0][1].element is None and parts[0][2] == slice(None):  # one source, all of it
        return read(parts[0][0], targets.dtypes[name]).to(targets.dtypes[name]).reshape(shape)
    value = torch.zeros(shape, dtype=targets.dtypes[name])
    for source, p, rows in targets.parts[name]:
        tensor = read(source, targets.dtypes[name], p.element)
        value[rows].copy_(tensor.reshape(value[rows].shape))
    return value


def kept_fp32(model, state: dict) -> set[str]:
    """The state names the model keeps fp32 under any cast: its KeepFp32Params modules' fp32 parameters
    (mHC, contraction, sinks, compressor position biases) and the routers' expert_bias."""
    from dsv4cli.model.fp32_params import KeepFp32Params

    names = {k for k in state if k.endswith("expert_bias")}
    for prefix, module in model.named_modules():
        if isinstance(module, KeepFp32Params):
            names.update(f"{prefix}.{n}" if prefix else n for n in module.fp32_param_names())
    return names & set(state)


def import_hf(hf_dir: str | Path, out: str | Path, spec_out: Optional[str | Path] = None,
              dtype: Optional[str] = None, layers: Optional[int] = None, experts: Optional[int] = None,
              progress: Optional[Callable[[int, int, int, int], None]] = None,
              announce: Optional[Callable[[int, int], None]] = None) -> dict:
    """Import; -> {"out", "spec", "checkpoint", "tensors", "bytes", "forecast", "dtypes", "mtp_depth",
    "layout", "dequantized", "notes"}.

    Before anything is written: `announce(forecast bytes of OUT, free bytes there)` and the disk check
    (ImportHFError when the forecast exceeds the free space: nothing written). `progress`: SourceReader's."""
    import torch

    from dsv4cli.build import UnsupportedSpecError
    from dsv4cli.build.model_summary import meta_model
    from dsv4cli.build.parallel import single_process
    from dsv4cli.ckpt.atomic import new_directory, write_text_atomic
    from dsv4cli.ckpt.save import TrainProgress, save_checkpoint
    from dsv4cli.infer.stream_save import ViewMaker, save_failures, streaming_strategy
    from dsv4cli.spec.layout import ParallelDims

    plan = plan_import(hf_dir, out, spec_out, layers, experts)
    cast = getattr(torch, dtype) if dtype else None
    forecast = forecast_bytes(plan.sources, dtype)
    free = free_bytes(plan.out)
    if announce is not None:
        announce(forecast, free)
    if forecast > free:
        raise ImportHFError(f"not enough disk space for {plan.out}: about {forecast} bytes needed, "
                            f"{free} bytes free on its filesystem")
    inside = plan.spec_file.resolve().parent == plan.out.resolve()
    with new_directory(plan.out) as tmp:
        with single_process(plan.spec, seed=0):
            try:
                model = meta_model(plan.spec)  # names, shapes and sharding, no memory
            except UnsupportedSpecError as e:
                raise ImportHFError(f"dsv4 cannot build this model yet: {e}") from None
            targets = place(model, plan.sources, cast)
            read = SourceReader(list(plan.sources.values()), plan.block, progress)
            make = ViewMaker(targets.state, lambda name: target_value(targets, name, read))
            dtypes = saved_dtypes(model)
            layout = ParallelDims.of(plan.spec, 1).checkpoint_layout()
            with save_failures(ImportHFError, SafetensorsError, bad=ImportHFError, other=ImportHFFailure):
                iter_dir = save_checkpoint(tmp, [model], None, None, TrainProgress(), plan.spec_text, layout,
                                           sharded_strategy=streaming_strategy(make))
        if plan.tokenizer is not None:
            shutil.copyfile(plan.tokenizer, tmp / TOKENIZER)
        shutil.copyfile(plan.hf_dir / "config.json", tmp / SOURCE_CONFIG)  # for export-hf's config.json
        if inside:
            write_text_atomic(tmp / plan.spec_file.name, plan.spec_text)
    if not inside:
        write_text_atomic(plan.spec_file, plan.spec_text)
    return {"out": str(plan.out), "spec": str(plan.spec_file), "checkpoint": str(plan.out / iter_dir.name),
            "tensors": len(plan.sources), "bytes": sum(map(stored_bytes, plan.sources.values())), "forecast": forecast,
            "dtypes": dtypes, "mtp_depth": plan.mtp_depth, "layout": plan.layout,
            "dequantized": sum(s.scale is not None for s in plan.sources.values()), "notes": plan.notes}


def saved_dtypes(model) -> dict[str, int]:
    """How many of the model's tensors (parameters and saved buffers) have each dtype."""
    import torch

    from dsv4cli.ckpt.metadata import dtype_name

    counted: dict[str, int] = {}
    for value in model.state_dict().values():
        if isinstance(value, torch.Tensor):
            counted[dtype_name(value.dtype)] = counted.get(dtype_name(value.dtype), 0) + 1
    return counted


def stored_bytes(s: SourceTensor) -> int:
    """Bytes a source tensor takes in its file (quantized weights: packed values + their scale)."""
    packed = 2 if s.scale is not None and s.dtype == "I8" else 1  # two FP4 codes a byte
    return math.prod(s.shape) * STORED_BYTES.get(s.dtype, 1) // packed + (stored_bytes(s.scale) if s.scale else 0)


KEPT_FP32 = re.compile(r"(^|\.)(attn_sink|ape|hc_\w+|gate\.bias)$|(^|\.)attn\.([\w.]*\.)?(q_)?norm\.weight$")
"""Original names (hf_names.original_name) of the tensors dsv4 keeps fp32 whatever --dtype says, for the
forecast before the model exists: sinks, position biases, mHC / hc_head, router bias, the attention's
q / kv / compressor norms (tests/test_infer_verify.py checks it against what an import saves)."""
SAVED_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def forecast_bytes(sources: dict[str, SourceTensor], dtype: Optional[str] = None) -> int:
    """Bytes of OUT's tensors: sum over sources of numel x the saved dtype's size (dequantized weights:
    `dtype` or bfloat16; tensors dsv4 keeps fp32: 4; other floating ones: `dtype` or their stored size;
    integer tables: their stored size). The vocabulary padding rows are not counted."""
    total = 0
    for s in sources.values():
        floating = s.scale is not None or s.dtype in ("F64", "F32", "F16", "BF16")
        if floating and KEPT_FP32.search(original_name(strip_prefix(s.name))):
            size = 4
        elif s.scale is not None:
            size = SAVED_BYTES[dtype or DEQUANTIZED_DEFAULT]
        elif floating and dtype is not None:
            size = SAVED_BYTES[dtype]
        else:
            size = STORED_BYTES.get(s.dtype, 1)
        total += math.prod(s.shape) * size
    return total


def free_bytes(out: Path) -> int:
    """Free bytes on the filesystem that will hold `out` (its nearest existing parent's)."""
    place = Path(out).resolve()
    while not place.exists():
        place = place.parent
    return shutil.disk_usage(place).free
