"""Is a checkpoint complete? The one check every command runs before it reads a checkpoint.

From metadata and file sizes only; no tensor is loaded:

    .metadata      parses (PyTorch DCP; `torch_free`: dsv4cli.ckpt.dcp_pickle, torch's reader as fallback)
    *.distcp       every file `.metadata` points at exists and reaches its largest offset + length
    common.pt      (loading=True) Megatron's common state: zip CRCs sound
    metadata.json  (loading=True) Megatron's config: valid JSON

`loading=True` is for the commands that hand the directory to `dist_checkpointing.load` (resume,
eval), which reads the last two files as well; `inspect` reads neither of them. A failure is a
CheckpointError whose message is one line naming the file.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Optional

from dsv4cli.ckpt.errors import CheckpointError
from dsv4cli.ckpt.layout import COMMON_STATE, MEGATRON_CONFIG, CheckpointLocation, iteration_of, resolve_checkpoint


def one_line(message: str) -> str:
    """Any message -> one line (library errors may span several)."""
    return re.sub(r"\s*\n\s*", " ", message).strip()


def integrity_problems(iter_dir: str | Path, loading: bool = False, torch_free: bool = False) -> list[str]:
    """What makes the checkpoint in `iter_dir` unusable (empty = complete). Raises CheckpointError when
    `.metadata` itself is missing or unreadable. torch_free: read `.metadata` without torch where it can."""
    from dsv4cli.ckpt.metadata import check_common_state, check_storage, read_dcp_metadata

    iter_dir = Path(iter_dir)
    _, problems = check_storage(iter_dir, read_dcp_metadata(iter_dir, torch_free))
    if loading:
        common = check_common_state(iter_dir / COMMON_STATE)
        if common:
            problems.append(common)
        config = iter_dir / MEGATRON_CONFIG
        if config.is_file():
            try:
                json.loads(config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.append(f"{MEGATRON_CONFIG} unreadable: {e}")
    return problems


def check_integrity(iter_dir: str | Path, loading: bool = False, torch_free: bool = False) -> None:
    """CheckpointError (one line naming the damaged file) unless `iter_dir` holds a complete checkpoint."""
    try:
        problems = integrity_problems(iter_dir, loading, torch_free)
    except CheckpointError as e:
        raise CheckpointError(one_line(str(e))) from None
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(one_line(f"{iter_dir}: damaged checkpoint: {problems[0]}{more}"))


def check_checkpoint(path: str | Path, loading: bool = False, torch_free: bool = False) -> CheckpointLocation:
    """Resolve a run root / iter_* / DCP directory and check it is complete -> its location
    (torch_free: without importing torch where dsv4cli.ckpt.dcp_pickle reads `.metadata`)."""
    loc = resolve_checkpoint(path)
    check_integrity(loc.iter_dir, loading, torch_free)
    return loc


def is_complete(iter_dir: Path, loading: bool = True) -> bool:
    try:
        check_integrity(iter_dir, loading)
    except CheckpointError:
        return False
    return True


def earlier_complete(run_dir: str | Path, before: Optional[int] = None) -> Optional[Path]:
    """The newest complete `iter_*` checkpoint in run_dir older than iteration `before` (all when None)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = [(it, d) for d in run_dir.iterdir()
             if (it := iteration_of(d.name)) is not None and d.is_dir() and (before is None or it < before)]
    for _, d in sorted(found, reverse=True):
        if is_complete(d):
            return d
    return None


def resume_advice(run_dir: str | Path, before: Optional[int] = None) -> str:
    """Where a resume can go instead of a damaged checkpoint, as a clause to append to its error."""
    earlier = earlier_complete(run_dir, before)
    if earlier is None:
        return f"; no earlier complete checkpoint in {run_dir}"
    return (f"; the newest complete earlier checkpoint is {earlier}: resume from it with "
            f"{shlex.join(['--set', f'checkpoint.load={earlier}'])}")


def check_resumable(iter_dir: str | Path) -> None:
    """check_integrity for a resume: the error also names the newest complete earlier checkpoint."""
    try:
        check_integrity(iter_dir, loading=True)
    except CheckpointError as e:
        iter_dir = Path(iter_dir)
        raise CheckpointError(str(e) + resume_advice(iter_dir.parent, iteration_of(iter_dir.name))) from None
