"""DeepSeek-V4 rotary embedding: interleaved pairs on the trailing `rope_dim` channels, optional YaRN.

Pairs are (x[2i], x[2i+1]) of the rope slice; channel pair i turns by position * inv_freq[i]. The
leading (nope) channels pass through. The inverse rotation (angle -theta) undoes it: DSv4 rotates
the attention output's rope slice back, since values share the rotated K tensor.
All activations here are sequence-first ([s, ...]); cos/sin broadcast over the middle dims.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dsv4cli.model.dsv4.attention_settings import RopeSettings


def _yarn_correction_range(settings: RopeSettings, rope_dim: int) -> tuple[float, float]:
    """Pair-index range [low, high] over which YaRN blends interpolated into extrapolated frequencies."""

    def pair_index_for(rotations: float) -> float:
        wavelengths = settings.original_max_position_embeddings / (rotations * 2 * math.pi)
        return rope_dim * math.log(wavelengths) / (2 * math.log(settings.theta))

    low = math.floor(pair_index_for(settings.beta_fast))
    high = math.ceil(pair_index_for(settings.beta_slow))
    return max(low, 0), min(high, rope_dim - 1)


def inverse_frequencies(settings: RopeSettings, rope_dim: int, device=None) -> Tensor:
    """[rope_dim / 2] fp32 angular frequency of each channel pair."""
    base = settings.theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim)
    extrapolated = 1.0 / base
    if settings.yarn_factor is None:
        return extrapolated
    interpolated = 1.0 / (settings.yarn_factor * base)
    low, high = _yarn_correction_range(settings, rope_dim)
    if high == low:
        high += 0.001
    pairs = torch.arange(rope_dim // 2, dtype=torch.float32, device=device)
    keep_extrapolated = 1 - ((pairs - low) / (high - low)).clamp(0, 1)
    return interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated


class Rotation:
    """cos/sin tables for given positions: positions [n] -> rotate(x [n, ..., d]) on x[..., -rope_dim:]."""

    def __init__(self, settings: RopeSettings, rope_dim: int, positions: Tensor):
        freqs = positions.float()[:, None] * inverse_frequencies(settings, rope_dim, positions.device)[None, :]
        self.cos, self.sin = freqs.cos(), freqs.sin()  # [n, rope_dim / 2] fp32 each
        self.rope_dim = rope_dim

    def rotate(self, x: Tensor, inverse: bool = False) -> Tensor:
        """[n, ..., d] -> [n, ..., d]: trailing rope_dim channels turned by +angle (or -angle)."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.rope_dim // 2,)
        cos, sin = self.cos.view(shape), self.sin.view(shape)
        if inverse:
            sin = -sin
        nope, rope = x[..., : -self.rope_dim], x[..., -self.rope_dim :].float()
        even, odd = rope[..., 0::2], rope[..., 1::2]
        turned = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
        return torch.cat([nope, turned.to(x.dtype)], dim=-1)
