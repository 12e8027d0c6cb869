"""The CPU workarounds (dsv4cli.compat): CUDA device requests land on CPU, the RNG tracker works on the
CPU generator, the MTP loss tracker lives on CPU, and activate() is idempotent."""

from __future__ import annotations

import torch

from dsv4cli.compat.cpu import cuda_as_cpu


def test_activate_is_idempotent_and_maps_cuda_to_cpu(cpu_compat):
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    assert cpu_compat.activate() is True and cpu_compat.activate() is True and cpu_compat.is_active()
    # megatron's hard-coded device="cuda" tensors land on CPU (schedules, clip_grads, ...)
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert clip_grads.torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor and schedules.torch.distributed is torch.distributed
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    t = torch.ones(2)
    assert t.cuda() is t
    with cuda_as_cpu():
        assert torch.zeros(3, device="cuda").device.type == "cpu"
        assert t.to("cuda").device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float64).dtype == torch.float64
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        pass


def test_no_process_wide_torch_function_mode(cpu_compat):
    """The CUDA->CPU mapping must not intercept the model's own ops (it cost ~50% of a step)."""
    from torch.overrides import _get_current_function_mode_stack

    cpu_compat.activate()
    assert _get_current_function_mode_stack() == []
    assert torch.ones(2).type() == "torch.FloatTensor"


def test_clip_grads_and_optimizer_step_run_on_cpu(cpu_compat):
    """clip_grad_by_total_norm_fp32 asserts CUDA grads and allocates on CUDA; it runs on CPU."""
    from megatron.core.optimizer import clip_grads, optimizer

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    optimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    assert torch.allclose(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32


def test_rng_tracker_forks_named_cpu_streams(cpu_compat):
    from megatron.core import tensor_parallel

    def draw():
        tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
        torch.manual_seed(5)
        a = torch.rand(3)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            b = torch.rand(3)
        c = torch.rand(3)
        return a, b, c

    a1, b1, c1 = draw()
    a2, b2, c2 = draw()
    assert torch.equal(b1, b2) and torch.equal(c1, c2)  # reproducible
    torch.manual_seed(5)
    ref = torch.rand(6)
    assert torch.equal(torch.cat([a1, c1]), ref)  # the fork leaves the default stream untouched
    assert not torch.equal(b1, ref[3:])


def test_mtp_loss_tracker_allocates_on_cpu(cpu_compat):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from dsv4cli.compat.versions import mtp_tracked_losses

    MTPLossLoggingHelper.tracker.clear()
    if hasattr(MTPLossLoggingHelper, "save_metrics_to_tracker"):  # megatron-core 0.19 (also counts hits)
        MTPLossLoggingHelper.save_metrics_to_tracker(torch.tensor(2.5), torch.tensor(1.0), torch.tensor(2.0), 1, 2)
    else:
        MTPLossLoggingHelper.save_loss_to_tracker(torch.tensor(2.5), 1, 2)
    assert mtp_tracked_losses().tolist() == [0.0, 2.5]
    MTPLossLoggingHelper.tracker.clear()


def test_checkpoint_without_output_needs_no_transformer_engine(cpu_compat):
    """megatron's CheckpointWithoutOutput() defaults to fp8 on (`fp8 is not None`) and then needs TE."""
    from megatron.core.tensor_parallel import random as mrandom

    ckpt = mrandom.CheckpointWithoutOutput()
    assert ckpt.fp8 is False or mrandom.HAVE_TE
    x = torch.randn(4, 3, requires_grad=True)
    y = ckpt.checkpoint(torch.nn.functional.silu, x)
    z = y * 3.0
    ckpt.discard_output_and_register_recompute(z)
    z.sum().backward()
    expected = torch.autograd.grad((torch.nn.functional.silu(x) * 3.0).sum(), x)[0]
    assert torch.allclose(x.grad, expected)
