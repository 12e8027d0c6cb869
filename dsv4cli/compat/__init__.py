"""Everything dsv4 needs to run on megatron-core where megatron assumes something else.

- `device`: the one place that decides the device (CUDA or CPU); nothing else asks torch.
- `activate()`: installs the CPU workarounds (a no-op with CUDA), once per process. Who calls it:
  the places where a process starts using megatron,
  * `dsv4cli.train.entry.run` (every torchrun worker, and `dsv4 train`/`dsv4 eval` in one process),
  * `dsv4cli.build.parallel.initialize_parallel`, the one parallel init every in-process path goes
    through (`single_process`: summary, verify, convert; `build_model` without groups; the trainer),
  * the session-scoped `cpu_compat` pytest fixture (tests/conftest.py), and scripts that set up
    megatron's groups themselves (test workers, benchmarks).
  Model code never calls it and has no device branches.
- `megatron_patches`: THE list of every patch of megatron-core internals dsv4 keeps, why, and the
  megatron-core versions each was checked against.
- `cpu` (torch.cuda, hard-coded CUDA tensors), `cpu_rng` (the RNG tracker), `cpu_megatron` (MTP,
  MoE, MLA, recompute, checkpoint writer), `distopt` (the distributed optimizer): the patches.

Importing this package imports neither torch nor megatron (`dsv4 validate` uses `device`).
"""

from __future__ import annotations

import threading

from dsv4cli.compat import device

_ACTIVE = False
_LOCK = threading.Lock()


def activate() -> bool:
    """Install every CPU patch of `megatron_patches` (once per process; idempotent).

    -> True when they are active (no CUDA), False on a CUDA machine, where nothing is patched.
    Call before megatron builds models or groups.
    """
    global _ACTIVE
    if device.cuda_available():
        return False
    with _LOCK:
        if not _ACTIVE:
            from dsv4cli.compat.megatron_patches import cpu_patches

            for patch in cpu_patches():
                patch.installer()()
            _ACTIVE = True
    return True


def is_active() -> bool:
    """True once activate() installed the CPU patches in this process."""
    return _ACTIVE
