"""CUDA requests on a CPU: torch.cuda's device/stream/event calls and megatron's hard-coded `device="cuda"`.

Installed by `dsv4cli.compat.activate()` on a machine without CUDA (never on a GPU machine); each
`patch_*` function is one record of `dsv4cli.compat.megatron_patches.PATCHES`, which says why.

A process-wide TorchFunctionMode mapping CUDA to CPU would intercept every op of every
forward/backward (~4,000 torch calls per tiny-spec step; measured +8-15 % step time on 2 loaded
cores), so the mapping is done where the CUDA requests are instead:
- the modules of `CUDA_HARDCODED_MODULES` see a `torch` whose tensor factories map CUDA devices
  to the CPU (`torch.zeros([], device="cuda")` in the schedules);
- `cuda_as_cpu()`, the TorchFunctionMode, is entered only around the few megatron functions that
  also compare `Tensor.type()` with the CUDA type name (`in_cuda_as_cpu(fn)`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

# megatron-core modules that create tensors with a literal device="cuda" on paths a CPU run
# reaches (or may reach: dist-ckpt exchange, MoE aux-loss tracker, attention masks).
CUDA_HARDCODED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
)


# --------------------------------------------------------------------------- torch.cuda


class _NullEvent:
    def record(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def wait(self, *args, **kwargs):
        return None

    def query(self):
        return True


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def synchronize(self):
        return None

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


_NULL_STREAM = _NullStream()


def patch_torch_cuda() -> None:
    """torch.cuda.current_device() -> the CPU device; synchronize, streams and events -> no-ops."""
    import torch

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = lambda *a, **k: _NULL_STREAM
    torch.cuda.default_stream = lambda *a, **k: _NULL_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.Tensor.record_stream = lambda self, *a, **k: None


# --------------------------------------------------------------------------- CUDA devices -> CPU


def _is_cuda_device(dev) -> bool:
    import torch

    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _make_mode_class():
    import torch
    from torch.overrides import TorchFunctionMode

    tensor_cuda = torch.Tensor.cuda
    tensor_type = torch.Tensor.type
    tensor_to = torch.Tensor.to

    class CudaToCpuMode(TorchFunctionMode):
        """device='cuda' / int -> cpu; Tensor.cuda() -> self; Tensor.type() -> CUDA type name."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is tensor_cuda:
                return args[0]
            if func is tensor_type and len(args) == 1 and not kwargs:
                name = func(*args)
                return _CUDA_TYPE_NAMES.get(name, name)
            if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                kwargs = dict(kwargs, device=torch.device("cpu"))
            if func is tensor_to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], torch.device("cpu"), *args[2:])
            return func(*args, **kwargs)

    return CudaToCpuMode


_MODE_CLASS = None


@contextlib.contextmanager
def cuda_as_cpu():
    """Inside: every torch call maps CUDA devices to CPU, `Tensor.cuda()` -> self, `Tensor.type()`
    -> the CUDA type name. For short megatron functions only (it intercepts every op)."""
    global _MODE_CLASS
    if _MODE_CLASS is None:
        _MODE_CLASS = _make_mode_class()
    with _MODE_CLASS():
        yield


def in_cuda_as_cpu(fn):
    """fn wrapped to run inside `cuda_as_cpu()` (idempotent)."""
    if getattr(fn, "_dsv4_cuda_as_cpu", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cuda_as_cpu():
            return fn(*args, **kwargs)

    wrapper._dsv4_cuda_as_cpu = True
    return wrapper


_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like",
)


def _cpu_torch_module():
    """A stand-in for the `torch` module whose tensor factories map CUDA devices to CPU;
    everything else is torch's own object (same functions, classes and submodules)."""
    import torch

    def mapped(factory):
        @functools.wraps(factory)
        def call(*args, **kwargs):
            dev = kwargs.get("device")
            if dev is not None and _is_cuda_device(dev):
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)

        return call

    class CpuTorch(types.ModuleType):
        def __getattr__(self, name):  # attributes torch creates lazily (submodules, ...)
            return getattr(torch, name)

    proxy = CpuTorch("torch")
    proxy.__dict__.update({k: v for k, v in vars(torch).items() if k not in ("__name__", "__spec__")})
    for name in _FACTORIES:
        setattr(proxy, name, mapped(getattr(torch, name)))
    proxy._dsv4_cpu_torch = True
    return proxy


def patch_hardcoded_cuda() -> None:
    """`torch` in CUDA_HARDCODED_MODULES -> a CPU-mapping stand-in; `Tensor.cuda()` -> the identity."""
    import torch

    proxy = _cpu_torch_module()
    for name in CUDA_HARDCODED_MODULES:
        mod = importlib.import_module(name)
        if getattr(getattr(mod, "torch", None), "_dsv4_cpu_torch", False):
            continue
        mod.torch = proxy
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def patch_clip_grads() -> None:
    """clip_grad_by_total_norm_fp32 (it asserts `grad.type() == 'torch.cuda.FloatTensor'`) runs in cuda_as_cpu()."""
    from megatron.core.optimizer import clip_grads, optimizer

    for mod in (clip_grads, optimizer):
        mod.clip_grad_by_total_norm_fp32 = in_cuda_as_cpu(clip_grads.clip_grad_by_total_norm_fp32)
