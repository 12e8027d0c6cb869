"""The one place that decides the device: CUDA when torch sees a GPU, otherwise CPU.

Every other module asks here instead of calling torch's availability check itself, so a
CPU/GPU difference has one source (tests simulate a machine by patching torch, which this
module reads at call time, never caches).
"""

from __future__ import annotations

import os


def cuda_available() -> bool:
    """True when torch can use a CUDA device (imports torch)."""
    import torch

    return torch.cuda.is_available()


def on_cpu() -> bool:
    """True when this process computes on the CPU."""
    return not cuda_available()


def local_device():
    """This process's compute device: `cuda:<LOCAL_RANK>` on GPU machines, `cpu` otherwise."""
    import torch

    if cuda_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def current_device():
    """The CUDA device torch is set to, or `cpu` (for tensors that must live where NCCL/gloo expects)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def synchronize() -> None:
    """Wait for the work queued on this process's GPU (timings, before a save returns); nothing on CPU."""
    import torch

    if cuda_available():
        torch.cuda.synchronize()
