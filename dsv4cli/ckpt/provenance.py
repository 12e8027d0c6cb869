"""dsv4_meta.json: where a checkpoint came from (versions, commit, spec hash, parallel layout, progress)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


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
    """The dsv4_meta.json document of a save (`layout`: the run's parallel sizes, ParallelDims.checkpoint_layout())."""
    import torch

    from dsv4cli import __version__
    from dsv4cli.compat.versions import megatron_core_version

    return {
        "format": "torch_dist",
        "dsv4_version": __version__,
        "torch_version": torch.__version__,
        "megatron_core_version": megatron_core_version(imported=True),
        "git_commit": _git_commit(),
        "spec_hash": spec_hash(spec_toml),
        "parallel": layout,
        "iteration": iteration,
        "tokens_seen": tokens_seen,
        "consumed_samples": consumed_samples,
    }
