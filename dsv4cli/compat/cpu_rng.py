"""megatron's RNG tracker on the CPU generator (megatron's tracker and its recompute hooks use CUDA generators).

Installed by `dsv4cli.compat.activate()` without CUDA; `patch_rng` is one record of
`dsv4cli.compat.megatron_patches.PATCHES`.
"""

from __future__ import annotations

import contextlib


def _make_cpu_tracker_class():
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's RNG tracker interface on the CPU generator (named CPU RNG states)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig = self.states_[orig_name]
                torch.set_rng_state(orig)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def patch_rng() -> None:
    """A tracker with megatron's add/fork/get_states/set_states interface on the CPU generator;
    CUDA RNG get/set (activation recompute, torch.cuda seeding) become no-ops."""
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    tracker_cls = _make_cpu_tracker_class()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker_cls()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs):
        if force_reset or not mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mrandom._CUDA_RNG_STATE_TRACKER = tracker_cls()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    def _force_reset_kw(args, kwargs):
        if len(args) >= 4:
            return bool(args[3])
        return bool(kwargs.get("force_reset", False))

    mrandom.initialize_rng_tracker = lambda *a, **k: initialize_rng_tracker(force_reset=_force_reset_kw(a, k))
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda *a, **k: None
