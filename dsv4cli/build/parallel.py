"""Process groups and RNG for a spec's parallel layout (megatron parallel_state), plus a 1-process group."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator, Optional

from dsv4cli.spec.schema import Spec


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(backend: Optional[str] = None) -> None:
    """torch.distributed from torchrun's env, or a 1-process group on a free port (env untouched)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        dist.init_process_group(backend=backend or default_backend())
    else:
        dist.init_process_group(
            backend=backend or default_backend(), init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )


def initialize_parallel(spec: Spec, seed: Optional[int] = None, backend: Optional[str] = None) -> None:
    """Init torch.distributed if needed, megatron model-parallel groups (tp/pp/vpp/cp/ep/etp) and the RNG tracker.

    Applies the CPU workarounds first (no-op on CUDA). Seeds: train.seed unless `seed` is given.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from dsv4cli.build.config import virtual_stages
    from dsv4cli.compat import versions
    from dsv4cli.model import cpu_compat

    cpu_compat.apply()
    versions.apply()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group(backend)
    par = spec.parallel
    vpp = virtual_stages(spec)
    world = dist.get_world_size()
    mp = par.tp * par.pp * par.cp
    if world % mp:
        raise ValueError(f"world size {world} is not a multiple of tp*pp*cp = {par.tp}*{par.pp}*{par.cp} = {mp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(spec.train.seed if seed is None else seed)


def destroy_parallel() -> None:
    """Tear down megatron groups and the default process group (if any)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def single_process(spec: Spec, seed: Optional[int] = None) -> Iterator[None]:
    """A 1-process gloo world with the spec's model-parallel sizes forced to 1 (CPU inspection, tests)."""
    import torch.distributed as dist

    owns = not dist.is_initialized()
    flat = spec.model_copy(update={"parallel": spec.parallel.model_copy(update=dict(
        tp=1, pp=1, vpp=1, cp=1, ep=1, etp=1, sequence_parallel=False, pp_layout=None))})
    try:
        initialize_parallel(flat, seed=seed, backend="gloo")
        yield
    finally:
        if owns:
            destroy_parallel()
