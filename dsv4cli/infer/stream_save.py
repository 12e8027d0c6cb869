"""Saving a model whose tensors do not exist yet: megatron's torch_dist checkpoint written one tensor
at a time (import-hf: the model lives on the meta device, each tensor is made from the source when
the writer asks for it, written, and dropped).

    save_checkpoint(..., sharded_strategy=streaming_strategy(make))     ckpt/save.py, unchanged otherwise

megatron's `dist_checkpointing.save` does everything it always does (factories, validation, common.pt,
metadata.json); only the tensor part differs from its default torch_dist strategy: the same
translation of its ShardedTensors to torch's (`mcore_to_pyt_state_dict`) and the same planner
(`MCoreSavePlanner`), but torch DCP's own `FileSystemWriter` with one thread, which resolves the
write items one by one (its serial loader) instead of all of them up front, and a planner whose
`resolve_data` turns the meta view it finds into real data: `make(meta view) -> tensor` of the
view's shape and dtype.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


def streaming_strategy(make: Callable):
    """A megatron SaveShardedStrategy ("torch_dist", version 1) whose tensor data comes from `make`."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner, TorchDistSaveShardedStrategy,
                                                                   _replace_state_dict_keys_with_sharded_keys,
                                                                   mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.planner import WriteItemType

    class OnDemandPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            return data if write_item.type == WriteItemType.BYTE_IO else make(data)

    class StreamingSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            writer = FileSystemWriter(str(checkpoint_dir), thread_count=1, per_thread_copy_ahead=0)
            planner = OnDemandPlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                      flatten_state_dict=False)
            dcp.save(mcore_to_pyt_state_dict(state, False), storage_writer=writer, planner=planner)

        def async_save(self, *args, **kwargs):
            raise NotImplementedError("the streaming save is synchronous")

    return StreamingSave("torch_dist", 1)


def failure_of(e: BaseException) -> BaseException:
    """The exception behind DCP's CheckpointException (a BaseException whose `failures` maps each rank
    to (exception, traceback)): the first rank's; `e` itself when it is no such wrapper."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for wrapped in failures.values():
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            if isinstance(inner, BaseException):
                return failure_of(inner)
    return e


@contextlib.contextmanager
def save_failures(*inputs: type, bad: type, other: type):
    """Around a streaming save: an error of the types `inputs` raised by `make` inside DCP's writer
    comes out as `bad(its message)`, anything else (DCP's CheckpointException included) as
    `other(one line)`; KeyboardInterrupt and SystemExit pass."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        cause = failure_of(e)
        if isinstance(cause, inputs):
            raise bad(str(cause)) from None
        from dsv4cli.ckpt.tensors import last_line

        raise other(f"the checkpoint could not be written ({type(cause).__name__}: {last_line(cause)})") from None


def release_free_memory() -> None:
    """Hand the heap's free memory back to the system now (glibc's malloc_trim(0)): the tensors a
    streaming save frees one after another would otherwise stay in the heap, since glibc raises its
    mmap threshold after each large free, and the process grow with each layer (50 MB over the 3
    layers of tests/test_infer_hf_memory.py's import). No lasting setting; nothing happens where the
    C library has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ViewMaker:
    """`make` for streaming_strategy from whole tensors: `state` {name: meta tensor} (the model's
    parameters and buffers) and `build(name) -> the whole tensor`. A meta view is traced to the tensor
    whose storage it shares and cut from the built tensor with the view's own size, strides and
    offset (a part of it copied out). The last built tensor is kept (the write items of one tensor
    come one after another); when the next one is asked for, the memory of the last one and of every
    copy handed out is released (resized to nothing: DCP's writer keeps a reference to each tensor it
    wrote until its file is closed, but has written it already)."""

    def __init__(self, state: dict, build: Callable):
        self._names = {t.untyped_storage()._cdata: name for name, t in state.items()}
        if len(self._names) != len(state):
            raise ValueError("two model tensors share storage: a streaming save cannot tell them apart")
        self._build = build
        self._name = None
        self._handed: list = []

    def release(self) -> None:
        """Free the memory of the last built tensor and of what was handed out from it, and give it
        back to the system (release_free_memory)."""
        for tensor in self._handed:
            if tensor.untyped_storage().resizable():
                tensor.untyped_storage().resize_(0)
        if self._handed:
            release_free_memory()
        self._name, self._handed = None, []

    def __call__(self, view):
        name = self._names.get(view.untyped_storage()._cdata)
        if name is None:
            raise ValueError(f"a checkpoint tensor {list(view.shape)} is no view of a model tensor")
        if self._name != name:
            self.release()
            whole = self._build(name)
            if not whole.is_contiguous() or whole.storage_offset() != 0 or whole.untyped_storage().nbytes() != whole.nbytes:
                whole = whole.clone(memory_format=torch.contiguous_format)  # a view of a larger tensor
            self._name, self._handed = name, [whole]
        whole = self._handed[0]
        if whole.dtype != view.dtype:
            raise ValueError(f"{name}: made {whole.dtype}, the model says {view.dtype}")
        out = whole.as_strided(view.shape, view.stride(), view.storage_offset())
        if out.nbytes != whole.nbytes:  # a part: its own copy (DCP would copy it and keep that)
            out = out.clone()
            self._handed.append(out)
        return out
