"""Legacy averaging contraction -> learned contraction, function-preserving (docs/design.md §2.3).

The converted checkpoint is the source plus `hc_head_fn = 0`, `hc_head_scale = 1`,
`hc_head_base = logit(1/n - eps)` for the main block and every MTP depth lacking them (so
`pre = 1/n` and the contraction stays the stream mean), zero Adam moments for them where the
optimizer state is stored per parameter, and the saved spec switched to `contraction.mode =
"learned"`. Nothing is loaded whole: the source `.distcp` files are copied byte for byte (reflink /
in-kernel copies, dsv4cli/ckpt/filecopy.py) or hard-linked (`link`), the new tensors go into one extra data file, and the DCP `.metadata` is the source's plus entries
pointing at that file. Output is written beside DST and renamed into place at the end.

No torch on that path (process start-up would cost more than copying a GiB): `.metadata` is read
and written by dsv4cli.ckpt.dcp_pickle, the new tensors written by dsv4cli.ckpt.new_entries in
DCP's format. Where those do not apply (a `.metadata` the codec cannot read, no readable float32
example entry, a non-float32 optimizer state, a `.metadata` over TORCH_FREE_MAX_METADATA) the same
steps run with torch (DCP's reader, `dcp.save`, `pickle.dump`); both give equal `.metadata` and data.
A global no DCP checkpoint holds is refused (metadata.read_dcp_metadata). `--drop-optimizer` imports
torch to rewrite `common.pt`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dsv4cli.ckpt.errors import CheckpointError
from dsv4cli.ckpt.filecopy import copy_ranges, transfer
from dsv4cli.ckpt.keys import contraction_blocks, hc_head_keys, infer_stream_layout, is_optimizer_key
from dsv4cli.ckpt.layout import (
    COMMON_STATE,
    DCP_METADATA,
    META_FILE,
    SPEC_FILE,
    TRACKER_FILE,
    iter_dir_name,
)
from dsv4cli.ckpt import dcp_pickle
from dsv4cli.ckpt.metadata import CheckpointInfo, check_common_state, read_checkpoint_info, read_dcp_metadata
from dsv4cli.ckpt.new_entries import EntryWriter, NewTensor
from dsv4cli.ckpt.optimizer_state import OptimizerLayout, new_optimizer_entries, optimizer_layout
from dsv4cli.ckpt.provenance import spec_hash

NEW_DATA_FILE = "__dsv4_hc_head.distcp"
DEFAULT_EPS = 1e-6
# Above this `.metadata` size the torch path is the faster one: dcp_pickle writes with the pure-Python
# pickler (~2-4 MB/s here), torch's start-up (~2.5 s) is then the smaller cost.
TORCH_FREE_MAX_METADATA = 4 << 20


def contraction_base(n: int, eps: float) -> float:
    """logit(1/n - eps) in float64: with fn = 0, scale = 1 it gives pre = sigmoid(base) + eps = 1/n."""
    p = 1.0 / n - eps
    if not 0.0 < p < 1.0:
        raise CheckpointError(f"eps {eps} is too large for n = {n} streams (1/n - eps must be in (0, 1))")
    return math.log(p) - math.log1p(-p)


@dataclass
class ConversionResult:
    """What convert did (or found), for the table and --json."""

    status: str  # "converted" | "already_converted"
    src: str
    dst: Optional[str]
    iteration: Optional[int]
    streams: int
    hidden: int
    eps: Optional[float]
    hc_head_base: Optional[float]
    stream_source: str
    eps_source: str
    added: list[str] = field(default_factory=list)
    optimizer: str = "none"
    optimizer_states: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    linked: bool = False  # copied_files are hard links to SRC's files (--link)
    spec_written: bool = False
    verify: Optional[dict] = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _resolve_spec(info: CheckpointInfo, spec_path: Optional[str], overrides: Sequence[str] = ()):
    """The spec in use: --spec, else the saved one; `overrides` (--set) apply to whichever it is."""
    from dsv4cli.spec.load import SpecError, load_spec

    if spec_path is not None:
        try:
            return load_spec(spec_path, overrides, rules=False), f"--spec {spec_path}"
        except SpecError as e:
            raise CheckpointError(f"--spec {spec_path}: " + "; ".join(str(p) for p in e.problems)) from None
    if info.spec_error:
        raise CheckpointError(f"saved spec is unreadable ({info.spec_error}); pass --spec")
    if info.spec is not None and overrides:
        try:
            return load_spec(info.iter_dir / SPEC_FILE, overrides, rules=False), "saved dsv4_spec.toml + --set"
        except SpecError as e:
            raise CheckpointError("saved dsv4_spec.toml with --set: " + "; ".join(str(p) for p in e.problems)) from None
    if info.spec is not None:
        return info.spec, "saved dsv4_spec.toml"
    if overrides:
        raise CheckpointError("--set needs a spec to override: none is saved in the checkpoint; pass --spec")
    return None, ""


@dataclass
class _Plan:
    info: CheckpointInfo
    spec: Any
    streams: int
    hidden: int
    eps: float
    stream_source: str
    eps_source: str
    missing_blocks: list[str]
    optimizer: OptimizerLayout

    @property
    def optimizer_mode(self) -> str:  # "none" | "per-parameter" | "dropped" | "unchanged"
        return self.optimizer.mode

    @property
    def optimizer_states(self) -> dict[str, str]:  # state name -> dtype of the reference entry
        return self.optimizer.states


def plan_conversion(
    src: str | Path,
    spec_path: Optional[str] = None,
    streams: Optional[int] = None,
    eps: Optional[float] = None,
    drop_optimizer: bool = False,
    overrides: Sequence[str] = (),
) -> _Plan:
    """Read SRC's metadata and decide what to add; CheckpointError for anything inconsistent."""
    info = read_checkpoint_info(src, torch_free=True)
    common = check_common_state(info.iter_dir / COMMON_STATE)
    if info.integrity_problems or common:
        problems = info.integrity_problems + ([common] if common else [])
        raise CheckpointError(f"{info.iter_dir}: corrupt checkpoint: " + "; ".join(problems))
    spec, spec_src = _resolve_spec(info, spec_path, overrides)
    shapes = {k: v.shape for k, v in info.model_tensors().items()}
    layout = infer_stream_layout(shapes)
    if layout is None:
        raise CheckpointError(
            f"{info.iter_dir}: no hyper-connection tensors (*_hyper_connection.mapping_proj.weight): "
            "a streams = 1 model has no output contraction to convert"
        )
    n_req, n_src = layout.streams, "stored mapping_proj shapes"
    if streams is not None:
        n_req, n_src = streams, "--streams"
    elif spec is not None:
        n_req, n_src = spec.model.mhc.streams, f"model.mhc.streams of the {spec_src}"
    if n_req != layout.streams:
        raise CheckpointError(
            f"{n_src} = {n_req} disagrees with the stored tensors: {layout.evidence} means n = {layout.streams}"
        )
    if spec is not None and spec.model.hidden_size != layout.hidden:
        raise CheckpointError(
            f"model.hidden_size of the {spec_src} = {spec.model.hidden_size}, but {layout.evidence} means h = {layout.hidden}"
        )
    if eps is not None:
        eps_val, eps_src = float(eps), "--eps"
    elif spec is not None:
        eps_val, eps_src = float(spec.model.contraction.eps), f"model.contraction.eps of the {spec_src}"
    else:
        eps_val, eps_src = DEFAULT_EPS, "default (no spec saved; pass --eps if the model ran with another)"
    contraction_base(layout.streams, eps_val)

    missing = []
    for block in contraction_blocks(shapes):
        present = [k for k in hc_head_keys(block) if k in shapes]
        if not present:
            missing.append(block)
        elif len(present) != len(hc_head_keys(block)):
            absent = sorted(set(hc_head_keys(block)) - set(present))
            raise CheckpointError(f"{block}: partial contraction parameters (has {present}, lacks {absent})")
        else:
            _check_head_shapes(block, shapes, layout.streams, layout.hidden)

    opt = optimizer_layout(info, missing, drop_optimizer) if missing else OptimizerLayout("unchanged")
    return _Plan(info, spec, layout.streams, layout.hidden, eps_val, n_src, eps_src, missing, opt)


def _check_head_shapes(block: str, shapes: dict, n: int, h: int) -> None:
    want = {"hc_head_fn": (n, n * h), "hc_head_base": (n,), "hc_head_scale": (1,)}
    for name, shape in want.items():
        if tuple(shapes[block + name]) != shape:
            raise CheckpointError(f"{block}{name}: stored shape {list(shapes[block + name])}, expected {list(shape)}")


def new_tensors(plan: _Plan) -> dict[str, NewTensor]:
    """{key: NewTensor} of everything the conversion adds (model parameters, then optimizer state)."""
    n, h = plan.streams, plan.hidden
    base = contraction_base(n, plan.eps)
    out: dict[str, NewTensor] = {}
    params: dict[str, NewTensor] = {}
    for block in plan.missing_blocks:
        params[block + "hc_head_fn"] = NewTensor.full((n, n * h), 0.0)
        params[block + "hc_head_base"] = NewTensor.full((n,), base)  # float64 logit rounded to float32
        params[block + "hc_head_scale"] = NewTensor.full((1,), 1.0)
    out.update(params)
    out.update(new_optimizer_entries(plan.optimizer, params))
    return out


def _is_within(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def _check_destination(src_dirs: list[Path], dst: Path, force: bool) -> None:
    d = dst.resolve()
    for s in src_dirs:
        s = s.resolve()
        if d == s or _is_within(d, s) or _is_within(s, d):
            raise CheckpointError(f"DST {dst} overlaps SRC {s}: convert never writes into the source")
    if dst.exists() and not force:
        raise CheckpointError(f"DST {dst} exists; pass --force to replace it")
    cwd = Path.cwd().resolve()
    if dst.exists() and (cwd == d or _is_within(cwd, d)):
        raise CheckpointError(f"DST {dst} holds the current directory; --force will not replace it, pick another DST")
    parent = next((p for p in dst.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CheckpointError(f"DST {dst}: {parent} is a file, not a directory")


def _write_new_tensors(tensors: dict[str, NewTensor], out: Path, writer: Optional[EntryWriter]):
    """Write `tensors` into out/NEW_DATA_FILE -> their Metadata entries (state_dict_metadata, storage_data):
    without torch by `writer`, else saved with PyTorch DCP (single process) into a scratch directory."""
    if writer is not None:
        return writer.write(tensors, out / NEW_DATA_FILE)
    import torch.distributed.checkpoint as dcp

    scratch = out.parent / "scratch"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({k: t.to_torch() for k, t in tensors.items()}, storage_writer=dcp.FileSystemWriter(str(scratch)),
                 no_dist=True)
    added = dcp.FileSystemReader(str(scratch)).read_metadata()
    files = sorted(p for p in scratch.iterdir() if p.name.endswith(".distcp"))
    if len(files) != 1:
        raise RuntimeError(f"expected one DCP data file for the new tensors, got {[p.name for p in files]}")
    os.replace(files[0], out / NEW_DATA_FILE)
    shutil.rmtree(scratch)
    return added


def _entry_writer(info: CheckpointInfo, tensors: dict[str, NewTensor]) -> Optional[EntryWriter]:
    """The torch-free writer of the new tensors, or None where the torch path is needed (the source's
    `.metadata` was read by torch or is large, has no float32 example entry, or a new tensor is not float32)."""
    if not dcp_pickle.is_standin(info.dcp_metadata) or any(t.dtype != "float32" for t in tensors.values()):
        return None
    if (info.iter_dir / DCP_METADATA).stat().st_size > TORCH_FREE_MAX_METADATA:
        return None
    try:
        return EntryWriter(info.dcp_metadata, info.iter_dir)
    except (dcp_pickle.Unsupported, OSError, ValueError, KeyError, AttributeError):
        return None


def _merge_metadata(orig, added, added_file: str, keep: Callable[[str], bool], relocate: dict):
    """Source Metadata minus dropped keys (data relocated per `relocate`) plus `added` entries in added_file."""
    sdm = {k: v for k, v in orig.state_dict_metadata.items() if keep(k)}
    storage = {}
    for idx, info in (orig.storage_data or {}).items():
        if keep(idx.fqn):
            storage[idx] = relocate.get(idx, info)
    for k, v in added.state_dict_metadata.items():
        sdm[k] = v
    for idx, info in added.storage_data.items():
        storage[idx] = dcp_pickle.replace(info, relative_path=added_file)
    planner = orig.planner_data
    if isinstance(planner, dict):
        planner = {k: v for k, v in planner.items() if keep(k)}
        for k in added.state_dict_metadata:
            planner[k] = (k,)
    merged = dcp_pickle.replace(orig, state_dict_metadata=sdm, storage_data=storage, planner_data=planner)
    if dcp_pickle.is_standin(orig):  # the stand-in's state holds every attribute
        return merged
    fields = {f.name for f in dataclasses.fields(orig)}
    for k, v in vars(orig).items():  # attributes writers attach beyond the dataclass (e.g. all_local_plans)
        if k not in fields:
            setattr(merged, k, v)
    return merged


def _updated_spec_text(spec, eps: float) -> str:
    from dsv4cli.spec.load import spec_to_toml

    new = spec.model_copy(deep=True)
    new.model.contraction.mode = "learned"
    new.model.contraction.eps = eps
    return spec_to_toml(new)


def _provenance(plan: _Plan, src_dir: Path, added: list[str]) -> dict:
    from dsv4cli import __version__

    meta = dict(plan.info.meta or {})
    history = list(meta.get("conversions", []))
    history.append(
        {
            "tool": f"dsv4 {__version__} convert-ckpt",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "from": str(src_dir.resolve()),
            "from_iteration": plan.info.iteration,
            "contraction": {"from": "average", "to": "learned", "streams": plan.streams, "eps": plan.eps,
                            "hc_head_base": contraction_base(plan.streams, plan.eps)},
            "added": added,
            "optimizer": plan.optimizer_mode,
        }
    )
    if plan.spec is not None and "spec_hash" in meta:
        history[-1]["spec_hash_before"] = meta["spec_hash"]
        meta["spec_hash"] = spec_hash(_updated_spec_text(plan.spec, plan.eps))  # the trainer's scheme
    meta["conversions"] = history
    meta["converted_from"] = history[-1]["from"]
    if plan.info.iteration is not None:
        meta.setdefault("iteration", plan.info.iteration)
    return meta


def write_converted(plan: _Plan, dst: Path, force: bool, fail_hook: Optional[Callable[[str], None]] = None,
                    link: bool = False) -> ConversionResult:
    """Write DST from a plan, atomically (temp dir beside DST, rename at the end).

    Unchanged files are copied, or hard-linked with `link` (same filesystem, else CheckpointError);
    every file written after that is a new one (written beside, then renamed), never a linked one.
    Without torch where the source's `.metadata` was read by dcp_pickle (see _entry_writer); where a
    stand-in turns out not to take a change (dcp_pickle.Unsupported), DST is written through torch instead."""
    added = new_tensors(plan)
    writer = _entry_writer(plan.info, added)
    if writer is not None:
        try:
            return _write(plan, added, writer, plan.info.dcp_metadata, dst, fail_hook, link)
        except dcp_pickle.Unsupported:  # nothing of DST is in place yet: the torch path from the start
            pass
    md = plan.info.dcp_metadata
    md = read_dcp_metadata(plan.info.iter_dir) if dcp_pickle.is_standin(md) else md
    return _write(plan, added, None, md, dst, fail_hook, link)


def _write(plan: _Plan, added: dict, writer: Optional[EntryWriter], md, dst: Path,
           fail_hook: Optional[Callable[[str], None]], link: bool) -> ConversionResult:
    info = plan.info
    src_dir = info.iter_dir
    iteration = info.iteration
    tmp = dst.parent / f".{dst.name}.dsv4-tmp-{os.getpid()}"
    old = dst.parent / f".{dst.name}.dsv4-old-{os.getpid()}"
    hook = fail_hook or (lambda stage: None)
    drop = plan.optimizer_mode == "dropped"
    keep = (lambda k: not is_optimizer_key(k)) if drop else (lambda k: True)

    dst.parent.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`: DST itself appears only at the end
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out = tmp / (iter_dir_name(iteration) if iteration is not None else iter_dir_name(0))
        if src_dir.name == "release":
            out = tmp / "release"
        out.mkdir(parents=True)
        copied, nbytes = [], 0
        relocate: dict = {}
        data_files = {i.relative_path for i in (md.storage_data or {}).values()}
        for entry in sorted(src_dir.iterdir()):
            name = entry.name
            if name in (DCP_METADATA, SPEC_FILE, META_FILE):
                continue
            hook(f"copy:{name}")
            if entry.is_dir():
                nbytes += transfer(entry, out / name, link)
                copied.append(name + "/")
            elif drop and name in data_files:
                items = sorted(
                    ((idx, si) for idx, si in md.storage_data.items() if si.relative_path == name and keep(idx.fqn)),
                    key=lambda t: t[1].offset,
                )
                offsets, size = copy_ranges(entry, out / name, [(si.offset, si.length) for _, si in items])
                for (idx, si), off in zip(items, offsets):
                    relocate[idx] = dcp_pickle.replace(si, offset=off)
                copied.append(name)
                nbytes += size
            elif drop and name == COMMON_STATE:
                import torch

                common = torch.load(entry, map_location="cpu", weights_only=False)
                if isinstance(common, dict):
                    common.pop("optimizer", None)
                torch.save(common, out / name)
                copied.append(name)
            else:
                nbytes += transfer(entry, out / name, link)
                copied.append(name)
        hook("new-tensors")
        added_md = _write_new_tensors(added, out, writer)
        hook("metadata")
        merged = _merge_metadata(md, added_md, NEW_DATA_FILE, keep, relocate)
        with open(out / (DCP_METADATA + ".tmp"), "wb") as f:
            if dcp_pickle.is_standin(merged):
                f.write(dcp_pickle.dumps(merged, pickle.DEFAULT_PROTOCOL))  # what pickle.dump writes for torch's
            else:
                pickle.dump(merged, f)
        os.replace(out / (DCP_METADATA + ".tmp"), out / DCP_METADATA)
        model_added = [k for k in added if not is_optimizer_key(k)]
        spec_written = False
        if plan.spec is not None:
            (out / SPEC_FILE).write_text(_updated_spec_text(plan.spec, plan.eps))
            spec_written = True
        (out / META_FILE).write_text(json.dumps(_provenance(plan, src_dir, model_added), indent=2) + "\n")
        (tmp / TRACKER_FILE).write_text("release" if out.name == "release" else str(iteration or 0))
        hook("rename")
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not dst.exists():
            os.replace(old, dst)
        raise
    return ConversionResult(
        status="converted",
        src=str(src_dir),
        dst=str(dst),
        iteration=iteration,
        streams=plan.streams,
        hidden=plan.hidden,
        eps=plan.eps,
        hc_head_base=contraction_base(plan.streams, plan.eps),
        stream_source=plan.stream_source,
        eps_source=plan.eps_source,
        added=model_added,
        optimizer=plan.optimizer_mode,
        optimizer_states=sorted(plan.optimizer_states),
        copied_files=copied,
        bytes_copied=nbytes,
        linked=link,
        spec_written=spec_written,
    )


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    spec_path: Optional[str] = None,
    streams: Optional[int] = None,
    eps: Optional[float] = None,
    force: bool = False,
    drop_optimizer: bool = False,
    verify: bool = False,
    fail_hook: Optional[Callable[[str], None]] = None,
    overrides: Sequence[str] = (),
    link: bool = False,
) -> ConversionResult:
    """`dsv4 convert-ckpt`: SRC (root or iter dir) -> DST root with the learned contraction.

    CheckpointError for bad input (CLI exit 2; also `link` across filesystems); an already converted
    SRC returns status 'already_converted' and writes nothing. `link`: hard-link SRC's unchanged
    files instead of copying them. With verify, `result.verify` holds the checks run.
    """
    if streams is not None and streams < 2:
        raise CheckpointError(f"--streams {streams}: hyper-connection checkpoints have n >= 2 streams")
    if eps is not None and not 0 < eps < 0.1:
        raise CheckpointError(f"--eps {eps}: must be in (0, 0.1)")
    plan = plan_conversion(src, spec_path, streams, eps, drop_optimizer, overrides)
    info = plan.info
    if not plan.missing_blocks:
        return ConversionResult(
            status="already_converted", src=str(info.iter_dir), dst=None, iteration=info.iteration,
            streams=plan.streams, hidden=plan.hidden, eps=None, hc_head_base=None,
            stream_source=plan.stream_source, eps_source=plan.eps_source,
        )
    shown = str(Path(dst))
    dst = Path(os.path.abspath(dst))  # "." or "out/" -> a path with a real name and parent
    src_dirs = [info.iter_dir] + ([info.location.root] if info.location.root else [])
    _check_destination(src_dirs, dst, force)
    result = write_converted(plan, dst, force, fail_hook, link)
    result.dst = shown
    if verify:
        from dsv4cli.ckpt.verify import verify_conversion

        result.verify = verify_conversion(info, dst, plan.spec, plan.streams, plan.hidden, plan.eps)
    return result
