"""Every random generator a rank uses (Python, NumPy, torch CPU/CUDA, megatron's tracker): saved per rank,
restored on resume under the same parallel layout."""

from __future__ import annotations

from dsv4cli.compat import device


def rng_state() -> dict:
    """This rank's generator states (a ShardedObject payload)."""
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if device.cuda_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned (the CUDA state only where a GPU is present)."""
    import random

    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.cuda_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
