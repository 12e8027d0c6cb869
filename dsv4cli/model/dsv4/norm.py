"""RMS normalisation as DeepSeek-V4 does it: statistics in fp32, fp32 weights, one cast back at the end."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dsv4cli.model.fp32_params import KeepFp32Params


def rms_normalize(x: Tensor, eps: float, weight: Optional[Tensor] = None) -> Tensor:
    """[..., d] -> [..., d]: x * rsqrt(mean(x^2) + eps) (times `weight` [d] when given), in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = weight.float() * y
    return y.to(x.dtype)


class RMSNorm(KeepFp32Params, torch.nn.Module):
    """Weighted RMSNorm whose weight [d] is kept in fp32 (DeepSeek keeps every norm weight in fp32),
    also through a mixed-precision wrapper's `.bfloat16()`."""

    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=torch.float32, device=device))

    def forward(self, x: Tensor) -> Tensor:
        """[..., d] -> [..., d]"""
        return rms_normalize(x, self.eps, self.weight)
