"""Shared pytest configuration.

Fixtures here import torch/megatron only when a test requests them, so spec/CLI tests stay fast.
- `cpu_compat` (session): the CPU workarounds installed (`dsv4cli.compat.activate()`, a no-op with
  CUDA); returns the `dsv4cli.compat` package.
- `megatron_1proc` (module): a 1-process gloo group with megatron model-parallel groups of size 1;
  torn down at the end of the module so other test modules can create their own.
- `_fresh_megatron_loss_scales` (every test, before and after): the class-level MTP / MoE aux-loss /
  indexer-loss backward scales and the MTP loss tracker as a fresh process has them (`fresh_loss_scales`).
"""

from __future__ import annotations

import os
import sys

import pytest

# Triton decides interpreter mode when a function is decorated, including triton.language's own
# helpers: a test module that imports triton early (transformers, megatron) would leave the kernel
# tests with compiled-mode helpers. The kernel tests run in the interpreter; set it before anything.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `crossversion` need a second virtualenv (DSV4_OTHER_VENV): deselected unless the -m
    expression names the marker (.ci/run: -m "crossversion or not crossversion"), whatever else -m says."""
    if "crossversion" in (config.option.markexpr or ""):
        return
    cross = [item for item in items if item.get_closest_marker("crossversion")]
    if cross:
        config.hook.pytest_deselected(items=cross)
        items[:] = [item for item in items if not item.get_closest_marker("crossversion")]


def fresh_loss_scales() -> None:
    """Class-level loss state as a fresh process has it (only where its module is imported):
    megatron's MTP / MoE aux-loss backward scales (MTPLossAutoScaler, MoEAuxLossAutoScaler), its
    MTP loss tracker, and dsv4's indexer-loss backward scale (IndexerLossAutoScaler)."""
    mtp = sys.modules.get("megatron.core.transformer.multi_token_prediction")
    moe = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    indexer = sys.modules.get("dsv4cli.model.dsv4.indexer_loss")
    if mtp is not None:
        import torch

        mtp.MTPLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)
        mtp.MTPLossLoggingHelper.tracker.clear()  # sized by the MTP depth of the model that ran last
    if moe is not None:
        moe.MoEAuxLossAutoScaler.main_loss_backward_scale = None
    if indexer is not None:
        indexer.IndexerLossAutoScaler.scale = None


@pytest.fixture(autouse=True)
def _fresh_megatron_loss_scales():
    """A training's schedule leaves optimizer loss scale / micro-batches in class attributes
    (fresh_loss_scales); a model run outside a schedule later in the session would backpropagate
    its MTP / aux / indexer losses scaled by it, unlike the fresh worker processes it is compared with.
    Reset before AND after every test: module-scoped fixtures (a one-process reference such as
    tests/test_model_distributed.py's) are set up before this function-scoped fixture, so only the
    reset after the previous test reaches them."""
    fresh_loss_scales()
    yield
    fresh_loss_scales()


@pytest.fixture(scope="session")
def cpu_compat():
    import dsv4cli.compat as compat

    compat.activate()
    return compat


@pytest.fixture(scope="module")
def megatron_1proc(cpu_compat):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from dsv4cli.build.parallel import init_process_group

    owns = not dist.is_initialized()
    init_process_group("gloo")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if owns and dist.is_initialized():
        dist.destroy_process_group()


def make_tiny_spec(**overrides):
    """A tiny Spec (h=32, 2 layers, 4 heads, seq 16, vocab 256) with dotted-key overrides,
    e.g. make_tiny_spec(**{"model.mhc.streams": 2, "parallel.tp": 2})."""
    from dsv4cli.spec.schema import Spec

    data = {
        "model": {
            "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64,
            "vocab_size": 256, "seq_length": 16,
            "mhc": {"streams": 4}, "contraction": {"mode": "learned"}, "mtp": {"depth": 1},
        },
        "train": {"micro_batch_size": 2, "global_batch_size": 2},
    }
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return Spec.model_validate(data)


@pytest.fixture
def tiny_spec():
    """Factory fixture: tiny_spec(**{"model.mhc.streams": 1}) -> Spec."""
    return make_tiny_spec
