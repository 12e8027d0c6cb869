"""dsv4cli/build/parallel.py: the one parallel init / teardown (backend, sizes check, state it forgets)."""

from __future__ import annotations

import pytest


def test_backend_follows_launch_backend_then_the_device(monkeypatch, tiny_spec):
    from dsv4cli.build.parallel import backend_for
    from dsv4cli.compat import device

    monkeypatch.setattr(device, "cuda_available", lambda: True)
    assert backend_for(tiny_spec()) == backend_for() == "nccl"
    assert backend_for(tiny_spec(**{"launch.backend": "gloo"})) == "gloo"
    monkeypatch.setattr(device, "cuda_available", lambda: False)
    assert backend_for(tiny_spec()) == backend_for() == "gloo"
    assert backend_for(tiny_spec(**{"launch.backend": "nccl"})) == "nccl"


def test_initialize_returns_the_dims_and_destroy_forgets_the_run(tiny_spec):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from dsv4cli.build.parallel import destroy_parallel, initialize_parallel
    from dsv4cli.spec.layout import ParallelDims

    spec = tiny_spec()
    try:
        dims = initialize_parallel(spec, backend="gloo")
        assert dims == ParallelDims.of(spec, dist.get_world_size()) and dims.world == 1
        assert ps.get_tensor_model_parallel_world_size() == 1
        with pytest.raises(ValueError, match=r"world size 1 is not divisible by tp\*pp\*cp = 2\*1\*1 = 2"):
            initialize_parallel(tiny_spec(**{"parallel.tp": 2}), backend="gloo")
        MTPLossLoggingHelper.tracker["values"] = torch.ones(1)
    finally:
        destroy_parallel()
    assert not ps.model_parallel_is_initialized() and not dist.is_initialized()
    assert "values" not in MTPLossLoggingHelper.tracker
