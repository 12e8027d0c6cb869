"""Quantized weights of the public DeepSeek-V4 release, dequantized while streaming (docs/interop.md).

    X.weight  F8_E4M3 [r, c]        + X.scale / X.weight_scale_inv  [ceil(r/bm), ceil(c/bn)]  (FP8, 128x128 blocks)
    X.weight  I8      [r, c/2]      + X.scale / X.weight_scale_inv  [r, c/32]  uint8 / F8_E8M0  (FP4 experts)

Value = stored value (FP8 as fp32; FP4: two e2m1 codes per byte, low nibble first, through the e2m1
table) x the scale of its block (fp32; uint8 scales are E8M0 exponents, 2^(byte - 127)), computed in
fp32 and cast once to the output dtype: the arithmetic of transformers' fine-grained FP8 integration
(`Fp8Dequantize`), so the result is bit-equal to it on the same bytes.

The block size: `weight_block_size` of the config's quantization_config (default 128 x 128) when the
scale grid is the ceiling-divided grid of that block (the last block row / column may be partial),
else, like transformers, shape / grid when the grid divides the shape (the FP4 experts' [1, 32]).

The other way (`dsv4 export-hf --dtype fp8`): `quantize_fp8` re-quantizes a weight to e4m3 with an
fp32 inverse scale per 128 x 128 block, with the arithmetic of transformers' `Fp8Quantize` (scale =
448 / block amax, stored inverse 1 / scale; partial last blocks are quantized as if zero-padded).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

from dsv4cli.infer.safetensors_io import SourceTensor

SCALE_SUFFIXES = (".scale", ".weight_scale_inv")
QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2", "I8")
DEFAULT_BLOCK = (128, 128)
FP8_MAX = 448.0
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class DequantError(ValueError):
    """A quantized weight without its scale, or a scale grid that does not fit its weight (exit 2)."""


def weight_of(scale_name: str) -> Optional[str]:
    """`X.scale` / `X.weight_scale_inv` -> `X.weight`; None for any other name."""
    for suffix in SCALE_SUFFIXES:
        if scale_name.endswith(suffix):
            return scale_name[: -len(suffix)] + ".weight"
    return None


def block_size(cfg: dict) -> tuple[int, int]:
    """The config's quantization_config.weight_block_size (default 128 x 128)."""
    block = (cfg.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_BLOCK
    return int(block[0]), int(block[1])


def fold_scales(sources: dict[str, SourceTensor]) -> dict[str, SourceTensor]:
    """Sources with every scale tensor attached to its weight (`SourceTensor.scale`; the weight's
    `shape` becomes the dequantized shape: FP4's packed columns doubled). A `X.scale` without a
    `X.weight` is left as it is (a tensor of its own); DequantError for a `.weight_scale_inv` without
    its weight or a FP8 weight without a scale. int8 tensors without a scale stay integer."""
    out = dict(sources)
    for name, source in sources.items():
        target = weight_of(name)
        if target is None or (target not in sources and name.endswith(".scale")):
            continue  # HF's module names have parameters called `scale` (attn_hc.scale): not a weight's scale
        if target not in sources:
            raise DequantError(f"scale tensor {name} has no weight {target}")
        weight = sources[target]
        if weight.scale is not None:
            raise DequantError(f"{target} has two scales ({weight.scale.name}, {name})")
        shape = weight.shape[:-1] + (2 * weight.shape[-1],) if weight.dtype == "I8" else weight.shape
        out[target] = replace(weight, shape=shape, scale=source)
        del out[name]
    unscaled = [s.name for s in out.values() if s.dtype.startswith("F8_") and s.scale is None]
    if unscaled:
        raise DequantError(f"{unscaled[0]} is stored as FP8 but has no .scale / .weight_scale_inv tensor")
    return out


def grid_block(shape: tuple, grid: tuple, block: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) block of a [rows, cols] weight with a [grid rows, grid cols] scale grid."""
    rows, cols = shape[-2:]
    if (math.ceil(rows / block[0]), math.ceil(cols / block[1])) == tuple(grid):
        return block
    if rows % grid[0] == 0 and cols % grid[1] == 0:
        return rows // grid[0], cols // grid[1]
    raise DequantError(f"a scale grid {list(grid)} does not fit a weight {[rows, cols]} "
                       f"(blocks of {list(block)})")


def unpack_fp4(packed):
    """int8 [.., c/2] (two e2m1 codes a byte, low nibble first) -> fp32 [.., c]."""
    import torch

    table = torch.tensor(FP4_E2M1, dtype=torch.float32)
    u8 = packed.contiguous().view(torch.uint8)
    pairs = torch.stack([table[(u8 & 0xF).long()], table[(u8 >> 4).long()]], dim=-1)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def dequantize(stored, scale, dtype, block: tuple[int, int] = DEFAULT_BLOCK):
    """stored [r, c] (FP8) or [r, c/2] (int8-packed FP4), scale [gr, gc] -> [r, c] in `dtype`:
    stored x scale of its block, in fp32, cast once."""
    import torch

    values = unpack_fp4(stored) if stored.dtype == torch.int8 else stored.to(torch.float32)
    grid = tuple(scale.shape[-2:]) if scale.dim() >= 2 else (1, 1)
    scale = scale.reshape(grid)
    factors = (scale.to(torch.float32) - 127.0).exp2() if scale.dtype == torch.uint8 else scale.to(torch.float32)
    rows, cols = values.shape[-2:]
    bm, bn = grid_block((rows, cols), grid, block)
    full = torch.zeros(grid[0] * bm, grid[1] * bn, dtype=torch.float32) if (rows, cols) != (grid[0] * bm, grid[1] * bn) else None
    if full is not None:  # partial last blocks: pad, scale, cut
        full[:rows, :cols] = values
        values = full
    scaled = values.reshape(grid[0], bm, grid[1], bn) * factors[:, None, :, None]
    return scaled.reshape(grid[0] * bm, grid[1] * bn)[:rows, :cols].to(dtype)


def quantize_fp8(weight, block: tuple[int, int] = DEFAULT_BLOCK):
    """weight [r, c] (any float) -> (e4m3 [r, c], fp32 inverse scales [ceil(r/bm), ceil(c/bn)]) with
    dequantize(q, s) ~ weight: per block, scale = 448 / amax (1 for an all-zero block), q = clamp(w x
    scale) in fp32, stored inverse = 1 / scale (transformers' Fp8Quantize, bit for bit)."""
    import torch

    rows, cols = weight.shape
    bm, bn = block
    grid = (math.ceil(rows / bm), math.ceil(cols / bn))
    values = weight.to(torch.float32)
    if (rows, cols) != (grid[0] * bm, grid[1] * bn):  # partial last blocks: zeros change no amax
        values = torch.nn.functional.pad(values, (0, grid[1] * bn - cols, 0, grid[0] * bm - rows))
    blocks = values.reshape(grid[0], bm, grid[1], bn)
    amax = blocks.abs().amax(dim=(1, 3))
    scales = torch.where(amax > 0, FP8_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    quantized = (blocks * scales[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return quantized.reshape(grid[0] * bm, grid[1] * bn)[:rows, :cols].contiguous(), (1.0 / scales).to(torch.float32)
