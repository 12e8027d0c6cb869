"""Process groups, RNG and model chunks for a spec's parallel layout (megatron parallel_state), its
teardown, and a 1-process group: the one parallel init / teardown of inspection, tools and training."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator, Optional

from dsv4cli.spec.layout import ParallelDims, single_process_spec
from dsv4cli.spec.schema import Spec


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(spec: Optional[Spec] = None) -> str:
    """torch.distributed backend: the spec's launch.backend; for "auto" (or no spec) nccl with CUDA, gloo on CPU."""
    from dsv4cli.compat.device import cuda_available

    chosen = spec.launch.backend if spec is not None else "auto"
    if chosen != "auto":
        return chosen
    return "nccl" if cuda_available() else "gloo"


def init_process_group(backend: Optional[str] = None) -> None:
    """torch.distributed from torchrun's env, or a 1-process group on a free port (env untouched)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        dist.init_process_group(backend=backend or backend_for())
    else:
        dist.init_process_group(
            backend=backend or backend_for(), init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )


def initialize_parallel(spec: Spec, seed: Optional[int] = None, backend: Optional[str] = None) -> ParallelDims:
    """Init torch.distributed if needed, megatron model-parallel groups (tp/pp/vpp/cp/ep/etp) and the RNG tracker.

    Applies the CPU workarounds first (no-op on CUDA). Seeds: train.seed unless `seed` is given.
    Backend: `backend`, else backend_for(spec). -> this run's ParallelDims (ValueError, with the
    sizes, when the world does not divide into the spec's process grids).
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from dsv4cli.build.config import virtual_stages
    from dsv4cli.compat import activate, versions
    from dsv4cli.compat.device import cuda_available, local_device

    activate()
    versions.apply()  # megatron-core version differences (every device)
    if cuda_available():
        torch.cuda.set_device(local_device())
    init_process_group(backend or backend_for(spec))
    par = spec.parallel
    vpp = virtual_stages(spec)
    dims = ParallelDims.of(spec, dist.get_world_size()).check()
    _forget_run_state()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(spec.train.seed if seed is None else seed)
    return dims


def _forget_run_state() -> None:
    """Drop megatron's process-wide state of an earlier run: its model-parallel groups and the
    MTP losses tracked at class level (MTPLossLoggingHelper)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.tracker.clear()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def destroy_parallel() -> None:
    """Tear down megatron's groups (and tracked MTP losses) and the default process group (if any)."""
    import torch.distributed as dist

    _forget_run_state()
    if dist.is_initialized():
        dist.destroy_process_group()


def ensure_parallel(spec: Spec) -> None:
    """initialize_parallel(spec) unless megatron's parallel state is already set up (by a caller)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(spec)


def build_model_chunks(spec: Spec) -> list:
    """This rank's unwrapped model chunks, one per virtual pipeline stage (one without VPP):
    pre/post_process from megatron's parallel_state, on this process's device, every parameter
    with megatron's tensor-parallel attributes (what DDP and the optimizer read).
    Initialises the parallel state first when that has not happened yet."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from dsv4cli.build.model import build_model
    from dsv4cli.compat.device import cuda_available, current_device

    ensure_parallel(spec)
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    chunks = []
    for i in range(vpp):
        vp_stage = i if vpp > 1 else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = build_model(spec, pre_process=pre, post_process=post, vp_stage=vp_stage)
        if cuda_available():
            chunk.cuda(current_device())
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        chunks.append(chunk)
    return chunks


@contextlib.contextmanager
def single_process(spec: Spec, seed: Optional[int] = None) -> Iterator[None]:
    """A 1-process gloo world for the spec's single-process copy (spec.layout.single_process_spec:
    CPU inspection, checkpoint verification, tests)."""
    import torch.distributed as dist

    owns = not dist.is_initialized()
    try:
        initialize_parallel(single_process_spec(spec), seed=seed, backend="gloo")
        yield
    finally:
        if owns:
            destroy_parallel()
