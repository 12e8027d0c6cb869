"""Every CPU workaround megatron-core 0.16.1 needs, in one place; a no-op when CUDA is available.

`apply()` is idempotent and must run once per process before models are built (the builder,
the trainer and the session-scoped pytest fixture call it). Production GPU runs never go
through this module. What each patch fixes (measured; docs/cpu.md says why each is needed):

- `torch.cuda.current_device()` -> the CPU device, `torch.cuda.synchronize()` -> no-op
  (GlobalMemoryBuffer, p2p shapes, router, RoPE, dist-ckpt all ask for the current device).
- Hard-coded CUDA in megatron (optimizer, clip_grads, grad scaler, schedules, dist-ckpt, MoE
  tracker, ...), patched where it is, so the model's own ops pay nothing:
  * the modules listed in `_CUDA_HARDCODED_MODULES` see a `torch` whose tensor factories map
    `device="cuda"`/int devices to CPU (`torch.zeros([], device="cuda")` in the schedules);
  * `Tensor.cuda()` is the identity (a CPU-only torch would raise there anyway);
  * `clip_grad_by_total_norm_fp32` (asserts `grad.type() == 'torch.cuda.FloatTensor'`) runs inside
    `cuda_as_cpu()`, a TorchFunctionMode that also maps `Tensor.type()` to the CUDA type name.
  A process-wide TorchFunctionMode would intercept every op of every forward/backward
  (~4,000 torch calls per tiny-spec step; measured +8-15% step time on 2 loaded cores), so it is
  only entered around the functions that need it.
- An RNG tracker with megatron's add/fork/get_states/set_states interface on the CPU generator,
  and no-op CUDA RNG get/set for activation recompute.
- MoE: null CUDA streams/events, `te_general_gemm = None` without TE, all-to-all split sizes
  as numpy arrays.
- `multi_latent_attention.HAVE_TE = False` when transformer_engine is not importable.
- `CheckpointWithoutOutput()` (selective "layernorm" recompute) sets `fp8 = fp8 is not None`, i.e.
  True for its default `fp8=False`, and then calls TE's FP8GlobalStateManager: without TE it is
  forced off (megatron's own TransformerLayer crashes with a NameError otherwise).
- torch_dist saving writes its buckets in-process (no forked writers, no spawn Manager).
- The distributed optimizer: it sorts params by `Tensor.type()` (run inside `cuda_as_cpu()`), and
  its checkpoints with torch's Adam need three fixes to resume exactly (`cpu_distopt`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import queue
import threading
import types

_APPLIED = False
_LOCK = threading.Lock()

# megatron-core 0.16.1 modules that create tensors with a literal device="cuda" on paths a CPU
# run reaches (or may reach: dist-ckpt exchange, MoE aux-loss tracker, attention masks).
_CUDA_HARDCODED_MODULES = (
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


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def apply() -> bool:
    """Install all CPU workarounds (once). Returns True when they are active, False on CUDA."""
    global _APPLIED
    if cuda_available():
        return False
    with _LOCK:
        if _APPLIED:
            return True
        _patch_torch_cuda()
        _patch_rng()
        _patch_moe()
        _patch_mla()
        _patch_checkpoint_without_output()
        _patch_dist_checkpointing()
        _patch_hardcoded_cuda()
        _APPLIED = True
    return True


def is_applied() -> bool:
    return _APPLIED


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


def _patch_torch_cuda() -> None:
    import torch

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = lambda *a, **k: _NULL_STREAM
    torch.cuda.default_stream = lambda *a, **k: _NULL_STREAM
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.Tensor.record_stream = lambda self, *a, **k: None


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


def _in_cuda_as_cpu(fn):
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


def _patch_hardcoded_cuda() -> None:
    import torch

    proxy = _cpu_torch_module()
    for name in _CUDA_HARDCODED_MODULES:
        mod = importlib.import_module(name)
        if getattr(getattr(mod, "torch", None), "_dsv4_cpu_torch", False):
            continue
        mod.torch = proxy
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    from megatron.core.optimizer import clip_grads, optimizer

    for mod in (clip_grads, optimizer):
        mod.clip_grad_by_total_norm_fp32 = _in_cuda_as_cpu(clip_grads.clip_grad_by_total_norm_fp32)

    from dsv4cli.model.cpu_distopt import patch_distributed_optimizer

    patch_distributed_optimizer(_in_cuda_as_cpu)


# --------------------------------------------------------------------------- RNG


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


def _patch_rng() -> None:
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


# --------------------------------------------------------------------------- MoE / MLA


def _patch_moe() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        import torch

        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.detach().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_mla() -> None:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        from megatron.core.transformer import multi_latent_attention

        multi_latent_attention.HAVE_TE = False


def _patch_checkpoint_without_output() -> None:
    """Without TE there is no fp8: make CheckpointWithoutOutput skip its FP8GlobalStateManager calls."""
    from megatron.core.tensor_parallel import random as mrandom

    if mrandom.HAVE_TE:
        return

    original_init = mrandom.CheckpointWithoutOutput.__init__

    def __init__(self, fp8=False):
        original_init(self, fp8)
        self.fp8 = False

    mrandom.CheckpointWithoutOutput.__init__ = __init__


# --------------------------------------------------------------------------- dist_checkpointing


def _patch_dist_checkpointing() -> None:
    """torch_dist save: write every bucket in this process (no fork, no spawn Manager)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    results = queue.Queue()
    fsa._get_write_results_queue = lambda: results

    def write_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue):
        local_results: queue.Queue = queue.Queue()
        count: queue.Queue = queue.Queue()
        collected: dict | Exception = {}
        for i, bucket in enumerate(write_buckets):
            count.put(i)
            fsa.FileSystemWriterAsync.write_preloaded_data(
                transform_list, i, bucket, local_results, count, True
            )
        for _ in write_buckets:
            idx, res = local_results.get_nowait()
            if isinstance(res, Exception):
                collected = res
                break
            collected[idx] = res
        global_results_queue.put(collected)

    fsa.FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write_in_process)
