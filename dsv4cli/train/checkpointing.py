"""Checkpoints in Megatron's torch_dist layout (DESIGN.md §2.6), written atomically.

    DIR/latest_checkpointed_iteration.txt        "100"
    DIR/iter_0000100/  .metadata, __R_K.distcp, metadata.json, common.pt,
                       dsv4_spec.toml, dsv4_meta.json

A save goes to `DIR/.tmp_iter_0000100.<pid>` first; once every rank has written and the dsv4
files are in, rank 0 renames it to `iter_0000100` and then replaces the `latest` file via a
temporary file + os.replace. A save killed midway leaves only a `.tmp_*` directory, which the
next save removes; `latest` never names an incomplete directory.

Stored: model (unwrapped module's sharded_state_dict), optimizer (per-parameter keys
`[chained_{i}.]optimizer.state.<exp_avg|exp_avg_sq>.<param key>`; the distributed optimizer writes
megatron's `fully_reshardable` format, the same keys plus `optimizer.state.param.<param key>`, so it
reshards across TP/PP/DP; resumed through train/optimizer_resume.py), scheduler, data position,
tokens seen and per-rank RNG state.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dsv4cli.ckpt.errors import CheckpointError  # noqa: F401  (the one checkpoint error, exit 2; re-exported)

LATEST = "latest_checkpointed_iteration.txt"
TMP_PREFIX = ".tmp_iter_"


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def resolve_checkpoint(path: str | Path) -> tuple[Path, int]:
    """Root dir (-> its latest) or one iter_* dir -> (iter dir, iteration). Raises CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (p / LATEST).is_file():
        text = (p / LATEST).read_text().strip()
        try:
            it = int(text)
        except ValueError:
            raise CheckpointError(f"{p / LATEST}: not an iteration number: {text!r}") from None
        d = p / iter_dirname(it)
        if not d.is_dir():
            raise CheckpointError(f"{p / LATEST} names iteration {it} but {d} does not exist")
        return d, it
    if p.name.startswith("iter_") and (p / ".metadata").is_file():
        try:
            return p, int(p.name[len("iter_"):])
        except ValueError:
            pass
    if (p / ".metadata").is_file():
        meta = read_meta(p)
        return p, int(meta.get("iteration", 0))
    raise CheckpointError(f"{path}: not a checkpoint (no {LATEST} and no .metadata)")


def latest_iteration(run_dir: str | Path) -> Optional[int]:
    f = Path(run_dir) / LATEST
    if not f.is_file():
        return None
    try:
        return int(f.read_text().strip())
    except ValueError:
        return None


def read_meta(iter_dir: Path) -> dict:
    f = Path(iter_dir) / "dsv4_meta.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------- spec / tensors checks


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def model_spec_differences(saved_toml: str, spec) -> list[str]:
    """Dotted `model.*` keys whose value differs between a saved spec and `spec` ("key: old -> new")."""
    from dsv4cli.spec.schema import ModelSpec

    saved = tomllib.loads(saved_toml).get("model", {})
    try:
        saved = ModelSpec.model_validate(saved).model_dump(mode="json")
    except Exception:
        pass  # compare raw values when the saved section no longer validates
    now = spec.model.model_dump(mode="json")
    a, b = _flatten(saved, "model"), _flatten(now, "model")
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def check_model_spec(iter_dir: Path, spec) -> None:
    """Refuse a checkpoint whose saved [model] differs from the spec's (CheckpointError)."""
    f = Path(iter_dir) / "dsv4_spec.toml"
    if not f.is_file():
        return
    diffs = model_spec_differences(f.read_text(), spec)
    if diffs:
        keys = f"{len(diffs)} key" + ("s" if len(diffs) != 1 else "")
        fresh = "--set checkpoint.dir=NEW_DIR" + (" without checkpoint.load" if spec.checkpoint.load else "")
        raise CheckpointError(
            f"{iter_dir}: the checkpoint's model differs from the spec ({keys}): " + "; ".join(diffs)
            + f". To train this model from scratch, use a new run directory ({fresh}); "
            f"to continue the checkpoint, use the spec it was saved with ({Path(iter_dir) / 'dsv4_spec.toml'})"
        )


def stored_tensors(iter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> global shape, read from DCP `.metadata` without touching tensor data."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        md = FileSystemReader(str(iter_dir)).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{iter_dir}: cannot read .metadata: {e}") from None
    return {
        k: tuple(v.size) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
    }


def has_optimizer_state(iter_dir: Path) -> bool:
    from dsv4cli.ckpt.keys import is_optimizer_key

    return any(is_optimizer_key(k) for k in stored_tensors(iter_dir))


def model_tensor_shapes(sharded_sd: dict) -> dict[str, tuple[int, ...]]:
    """Sharded state dict (consumed: factories are applied) -> {stored key: global shape}."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_sd)  # e.g. SwiGLU's fc1 factory -> its stored tensors
    out = {}
    for v in nested_values(sharded_sd):
        if isinstance(v, ShardedTensor):
            out[v.key] = tuple(v.global_shape)
    return out


def tensor_problems(iter_dir: Path, expected: dict[str, tuple[int, ...]]) -> list:
    """The model's tensors vs the checkpoint's model tensors -> [KeyProblem] (empty = they match)."""
    from dsv4cli.ckpt.keys import is_optimizer_key
    from dsv4cli.ckpt.summary import KeyProblem

    stored = {k: v for k, v in stored_tensors(iter_dir).items() if not is_optimizer_key(k)}
    problems = [KeyProblem.of("missing", k, str(list(expected[k]))) for k in sorted(set(expected) - set(stored))]
    problems += [KeyProblem.of("unexpected", k, str(list(stored[k]))) for k in sorted(set(stored) - set(expected))]
    problems += [KeyProblem.of("mis-shaped", k, f"checkpoint {list(stored[k])}, model {list(expected[k])}")
                 for k in sorted(set(stored) & set(expected)) if stored[k] != expected[k]]
    return problems


def tensor_mismatches(iter_dir: Path, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Compare the model's tensors with the checkpoint's; -> problem lines (empty = matches)."""
    return [str(p) for p in tensor_problems(iter_dir, expected)]


def check_tensors(iter_dir: Path, expected: dict[str, tuple[int, ...]], verbose: Optional[bool] = None) -> None:
    """CheckpointError with a summary (counts, first few, legacy hint) unless the tensors match.

    `verbose` lists every key (None: whether `--verbose` is in effect, dsv4cli.noise)."""
    from dsv4cli.ckpt.layout import resolve_checkpoint as locate
    from dsv4cli.ckpt.summary import legacy_hint, summarize
    from dsv4cli.noise import verbose_requested

    if verbose is None:
        verbose = verbose_requested()

    problems = tensor_problems(iter_dir, expected)
    if problems:
        loc = locate(iter_dir)
        hint = legacy_hint(problems, loc.root or loc.iter_dir)
        raise CheckpointError(f"{iter_dir}: checkpoint tensors do not match the spec: "
                              + summarize(problems, verbose=verbose, hints=[hint] if hint else []))


# --------------------------------------------------------------------------- provenance


def _git_commit() -> Optional[str]:
    import subprocess

    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def spec_hash(spec_toml: str) -> str:
    import hashlib

    return hashlib.sha256(spec_toml.encode()).hexdigest()[:16]


def build_meta(spec_toml: str, layout: dict, iteration: int, tokens_seen: int, consumed_samples: int) -> dict:
    import torch

    from dsv4cli import __version__

    try:
        from megatron.core import package_info

        mcore = package_info.__version__
    except Exception:
        mcore = None
    return {
        "format": "torch_dist",
        "dsv4_version": __version__,
        "torch_version": torch.__version__,
        "megatron_core_version": mcore,
        "git_commit": _git_commit(),
        "spec_hash": spec_hash(spec_toml),
        "parallel": layout,
        "iteration": iteration,
        "tokens_seen": tokens_seen,
        "consumed_samples": consumed_samples,
    }


# --------------------------------------------------------------------------- atomic directory handling


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_stale_tmp(run_dir: Path) -> list[Path]:
    """Delete leftovers of saves that were killed midway (rank 0, before a new save)."""
    removed = []
    for p in Path(run_dir).glob(TMP_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def tmp_dir_for(run_dir: Path, iteration: int, token: str) -> Path:
    return Path(run_dir) / f"{TMP_PREFIX}{iteration:07d}.{token}"


def publish(tmp: Path, run_dir: Path, iteration: int) -> Path:
    """Rename a complete temp dir to iter_XXXXXXX and move `latest` to it (rank 0)."""
    final = Path(run_dir) / iter_dirname(iteration)
    _fsync_dir(tmp)
    if final.exists():  # re-saving an iteration: move the old one aside first
        old = Path(run_dir) / f"{TMP_PREFIX}{iteration:07d}.old{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(Path(run_dir))
    write_text_atomic(Path(run_dir) / LATEST, f"{iteration}\n")
    return final


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` iter_* dirs (0 = all); never removes the one `latest` names."""
    if keep_last <= 0:
        return []
    latest = latest_iteration(run_dir)
    dirs = sorted(
        (p for p in Path(run_dir).glob("iter_*") if p.is_dir() and p.name[5:].isdigit()),
        key=lambda p: int(p.name[5:]),
    )
    removed = []
    for p in dirs[:-keep_last]:
        if int(p.name[5:]) == latest:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# --------------------------------------------------------------------------- save / load (collective)


@dataclass
class TrainProgress:
    iteration: int = 0
    consumed_samples: int = 0
    tokens_seen: int = 0


def _rng_state() -> dict:
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_sharded_sd(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_checkpoint(run_dir: str | Path, chunks, optimizer, scheduler, progress: TrainProgress,
                    spec_toml: str, layout: dict, keep_last: int = 0) -> Path:
    """Collective save of model/optimizer/scheduler/progress/RNG to run_dir/iter_XXXXXXX (atomic).

    `chunks` are the unwrapped model chunks (no DDP wrapper); `optimizer`/`scheduler` may be None.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    run_dir = Path(run_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    token = [f"{os.getpid()}"]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(run_dir)
    dist.broadcast_object_list(token, src=0)
    tmp = tmp_dir_for(run_dir, progress.iteration, token[0])
    if rank == 0:
        tmp.mkdir(parents=True)
    dist.barrier()

    state = _model_sharded_sd(chunks)
    if optimizer is not None:
        from dsv4cli.train.adam_state import optimizer_sharded_sd

        state["optimizer"] = optimizer_sharded_sd(optimizer, state)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    state["progress"] = {
        "iteration": progress.iteration,
        "consumed_samples": progress.consumed_samples,
        "tokens_seen": progress.tokens_seen,
    }
    state["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    final = run_dir / iter_dirname(progress.iteration)
    if rank == 0:
        (tmp / "dsv4_spec.toml").write_text(spec_toml)
        meta = build_meta(spec_toml, layout, progress.iteration, progress.tokens_seen, progress.consumed_samples)
        (tmp / "dsv4_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        final = publish(tmp, run_dir, progress.iteration)
        prune(run_dir, keep_last)
    dist.barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return final


def load_checkpoint(iter_dir: Path, chunks, optimizer, scheduler, layout: dict,
                    load_optimizer: bool = True) -> tuple[TrainProgress, list[str]]:
    """Collective load into the unwrapped chunks (+ optimizer/scheduler/RNG when present).

    -> (progress, notes). Notes say what was not restored (no optimizer state, other layout).
    """
    from megatron.core import dist_checkpointing

    notes = []
    meta = read_meta(iter_dir)
    model_sd = _model_sharded_sd(chunks)
    state = dict(model_sd)
    with_opt = load_optimizer and optimizer is not None and has_optimizer_state(iter_dir)
    if optimizer is not None and load_optimizer and not with_opt:
        notes.append("checkpoint has no optimizer state: starting with a fresh optimizer")
    if optimizer is not None and not load_optimizer:
        notes.append("checkpoint.load_optimizer = false: starting with a fresh optimizer")
    common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    across = False
    if with_opt:
        from dsv4cli.train import adam_state
        from dsv4cli.train.optimizer_resume import optimizer_request

        saved = adam_state.saved_sharding(common)
        across = (saved is not None) != adam_state.is_distributed(optimizer)  # distributed optimizer on <-> off
        if not across:
            opt_request = optimizer_request(
                optimizer, model_sd, iter_dir, meta.get("parallel"), layout,
                metadata={"distrib_optim_sharding_type": saved or adam_state.DISTOPT_SHARDING})
            state[opt_request.key] = opt_request.sharded
    same_layout = meta.get("parallel") == layout
    if same_layout:
        import torch.distributed as dist
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        state["rng_state"] = ShardedObject(
            "rng_state", None, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0
        )
    loaded = dist_checkpointing.load(state, str(iter_dir))
    for i, c in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        c.load_state_dict(loaded[key])
    if with_opt and not across:
        opt_request.load_into(optimizer, loaded, iter_dir)
    if across:
        adam_state.load_across(iter_dir, _model_sharded_sd(chunks), optimizer, common)  # (load consumed model_sd)
        kind = "distributed" if saved is not None else "plain"
        notes.append(f"optimizer state taken over from the {kind} optimizer that wrote the checkpoint")
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if same_layout and loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    prog = common.get("progress", {})
    progress = TrainProgress(
        iteration=int(prog.get("iteration", meta.get("iteration", 0))),
        consumed_samples=int(prog.get("consumed_samples", meta.get("consumed_samples", 0))),
        tokens_seen=int(prog.get("tokens_seen", meta.get("tokens_seen", 0))),
    )
    return progress, notes


def load_model_weights(iter_dir: Path, chunks) -> None:
    """Model weights only (for eval)."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(_model_sharded_sd(chunks), str(iter_dir))
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
