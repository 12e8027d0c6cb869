"""dsv4cli.compat.multi_tensor: the foreach replacements of megatron's local multi-tensor helpers give
bit-identical results, and activate() installs them where megatron fell back to the local ones."""

from __future__ import annotations

import torch

from dsv4cli.compat import multi_tensor as mt


def _tensors(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1,), (24, 512), (3,), (128,), (1000, 7), (24,)]
    return [torch.randn(s, generator=g).mul_(10.0 ** (i - 3)).to(dtype) for i, s in enumerate(shapes)]


def test_l2_norm_is_bit_identical_to_megatrons(cpu_compat):
    from megatron.core import utils

    lists = [_tensors(0), _tensors(1)]
    ours, _ = mt.multi_tensor_l2_norm(2048 * 32, None, lists, False)
    theirs, _ = utils.local_multi_tensor_l2_norm(2048 * 32, None, lists, False)
    assert ours.shape == theirs.shape == (1,) and ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours, theirs) and ours.item() > 0
    assert mt.multi_tensor_l2_norm(0, None, [[]], False)[0].item() == 0.0


def test_scale_in_place_and_copy_are_bit_identical_to_megatrons(cpu_compat):
    from megatron.core import utils

    for scale in (0.3141, 1.0):
        a, b = _tensors(2), _tensors(2)
        mt.multi_tensor_scale(0, None, [a, a], scale)
        utils.local_multi_tensor_scale(0, None, [b, b], scale)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    src = _tensors(3)
    ours, theirs = _tensors(4, torch.bfloat16), _tensors(4, torch.bfloat16)  # main fp32 -> model bf16
    mt.multi_tensor_scale(0, None, [src, ours], 1.0)
    utils.local_multi_tensor_scale(0, None, [src, theirs], 1.0)
    assert all(torch.equal(x, y) and x.dtype == torch.bfloat16 for x, y in zip(ours, theirs))
    assert torch.equal(ours[1], src[1].to(torch.bfloat16))


def test_activate_installs_the_foreach_helpers(cpu_compat):
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    if getattr(utils, "local_multi_tensor_scale", None) is None:  # pragma: no cover
        return
    assert clip_grads.l2_norm_impl is mt.multi_tensor_l2_norm
    assert clip_grads.multi_tensor_scale_impl is mt.multi_tensor_scale
    assert optimizer.multi_tensor_scale_impl is mt.multi_tensor_scale
