"""Launch settings shared by every Triton op: tuning constants, block sizes, per-kernel launch configs, input checks.

Block sizes are powers of two; the constants are module attributes read at launch time, so tests lower them
(`monkeypatch.setattr(launch, "MAX_BLOCK_T", 16)`) to exercise multi-block loops on tiny shapes and
benchmarks/gpu_check.py sweeps them on a GPU. The `*_meta` functions return the constexprs and launch options
one kernel is compiled with (tests/test_kernels_compile.py compiles exactly these for sm_90).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton without knobs (< 3.4): it reads the variable itself
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")

# Block-size caps (powers of two). Tests lower them to exercise multi-block loops on tiny shapes.
MAX_BLOCK_T = 64
MAX_BLOCK_K = 128
MAX_BLOCK_H = 256
PROJ_BWD_SPLITS = 8
MIN_PROGRAMS = 512  # token blocks shrink (or stop growing) to keep at least this many programs
# Learned contraction forward: token rows of up to this many (padded) elements are held on chip whole,
# so x is read once (`_contract_fwd_row`); wider rows use the two-pass `_contract_fwd`. 0 forces two-pass.
CONTRACT_ROW_MAX_ELEMS = 32768
CONTRACT_ROW_PER_THREAD = 64  # row elements per thread (sets num_warps)
CONTRACT_ROW_MIN_ELEMS = 8192  # narrow rows: several tokens per program up to this many elements
CONTRACT_BWD_ROW_MAX_ELEMS = 16384  # backward with rows on chip (it holds more per element than the forward)
# Two-pass fallback: tokens per program. Larger amortises the head_fn reads (L2), smaller keeps the block
# that pass 2 re-reads (BT * n*h elements) small enough to still be in L1/L2. Untimed; gpu_check.py sweeps it.
CONTRACT_TWO_PASS_BT = 16
DOT_PRECISION = "tf32x3"  # ~fp32 accuracy on tensor cores; the interpreter computes in fp32 anyway

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------ input checks


def check_device(*tensors: Tensor) -> None:
    """One device for all; CUDA, or CPU under TRITON_INTERPRET=1; fp32/bf16/fp16 (ValueError otherwise)."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"triton kernels on {dev.type} tensors need TRITON_INTERPRET=1 set before dsv4cli.kernels.triton_ops "
            "is first imported"
        )
    for t in tensors:
        if t.dtype not in _SUPPORTED:
            raise ValueError(f"triton kernels take float32/bfloat16/float16 tensors, got {t.dtype} (use impl='torch')")


def stream_width(x: Tensor, n: int) -> int:
    """x [..., n*h] -> K = n*h (ValueError when the last dim is not a multiple of n)."""
    K = x.shape[-1]
    if K % n:
        raise ValueError(f"last dim {K} of x is not a multiple of n={n}")
    return K


def check_iterations(iterations: int) -> None:
    if iterations < 1:
        raise ValueError(f"sinkhorn iterations must be >= 1, got {iterations}")


def flat(x: Tensor, width: int, name: str) -> Tensor:
    """[..., width] -> contiguous [T, width] (copies non-contiguous inputs)."""
    if x.shape[-1] != width:
        raise ValueError(f"{name}: last dim must be {width}, got shape {tuple(x.shape)}")
    return x.reshape(-1, width).contiguous()


# ------------------------------------------------------------------------------------------ block sizes


def p2(v: int) -> int:
    """The next power of two >= v (>= 1)."""
    return triton.next_power_of_2(max(int(v), 1))


def block_t(T: int, lo: int = 1) -> int:
    """Token block: the largest power of two <= MAX_BLOCK_T that still gives >= MIN_PROGRAMS programs (else lo)."""
    bt = max(lo, min(p2(T), MAX_BLOCK_T))
    while bt > lo and triton.cdiv(T, bt) < MIN_PROGRAMS:
        bt //= 2
    return bt


def coef_block(T: int, n: int) -> int:
    """Tokens per program of the per-token [n, n] kernels (mHC coefficients, Sinkhorn)."""
    return max(1, min(p2(T), MAX_BLOCK_T, 256 // (p2(n) ** 2) or 1))


def stream_blocks(T: int, n: int, h: int, budget: int = 4096) -> tuple[int, int, int]:
    """(BT, NP, BH) for [BT, NP, BH] tiles of about `budget` elements."""
    NP = p2(n)
    BH = max(16, min(p2(h), MAX_BLOCK_H))
    BT = max(1, min(p2(T), MAX_BLOCK_T, budget // (NP * BH) or 1))
    return BT, NP, BH


@triton.jit
def token_tile(T, BT: tl.constexpr, NP: tl.constexpr, BH: tl.constexpr):
    """This program's tile of a (token block, h block) grid -> rows [BT], d [BH], streams [NP], rows < T."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    return rows, tl.program_id(1) * BH + tl.arange(0, BH), tl.arange(0, NP), rows < T


@triton.jit
def stream_tile(T, n: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr):
    """This program's token block -> rows [BT], streams [NP], rows < T and the [BT, NP] mask of real (token, stream)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    i = tl.arange(0, NP)
    rmask = rows < T
    return rows, i, rmask, rmask[:, None] & (i[None, :] < n)


# ------------------------------------------------------------------------------------------ launch configs


def proj_fwd_meta(T: int, K: int, M: int, elem_bytes: int = 2) -> dict:
    """Constexprs and launch options of `_proj_sumsq_fwd` (chosen so ptxas reports no spills on sm_90)."""
    BM = max(16, p2(M))
    BK = max(16, min(p2(K), MAX_BLOCK_K, 64 if BM <= 32 else 32))
    return dict(BT=block_t(T, 16), BK=BK, BM=BM, PREC=DOT_PRECISION, num_warps=8, num_stages=3)


def proj_bwd_meta(T: int, K: int, M: int, elem_bytes: int = 2) -> dict:
    """Constexprs and launch options of `_proj_bwd` (no spills on sm_90 for n <= 8, bf16 and fp32)."""
    BM = max(16, p2(M))
    if BM <= 32:
        bt, bn = (64 if elem_bytes <= 2 else 32), 64
    else:
        bt, bn = 16, (64 if elem_bytes <= 2 else 32)
    BN = max(16, min(p2(K), MAX_BLOCK_K, bn))
    return dict(BT=min(block_t(T, 16), bt), BN=BN, BM=BM, PREC=DOT_PRECISION, num_warps=8, num_stages=3)


def post_res_bwd_meta(T: int, n: int, h: int) -> dict:
    """`_post_res_bwd` holds [BT, NP, NP, BH] products and [BT, NP, BH] tiles: keep them <= 4096 / 2048 elements."""
    NP = p2(n)
    BH = max(16, min(p2(h), MAX_BLOCK_H, 4096 // (NP * NP)))
    BT = max(1, min(p2(T), MAX_BLOCK_T, 4096 // (NP * NP * BH), 2048 // (NP * BH)))
    return dict(BT=BT, NP=NP, BH=BH)


def contract_fwd_meta(T: int, n: int, h: int) -> dict:
    """Constexprs and launch options of `_contract_fwd` (the two-pass fallback)."""
    return dict(
        BT=CONTRACT_TWO_PASS_BT, BK=max(16, min(p2(n * h), MAX_BLOCK_K, 64)), BM=max(16, p2(n)),
        BH=max(16, min(p2(h), MAX_BLOCK_H, 128 if n <= 4 else 64)), PREC=DOT_PRECISION, num_warps=8, num_stages=3,
    )  # fmt: skip


def contract_row_meta(T: int, n: int, h: int) -> dict | None:
    """Constexprs and launch options of `_contract_fwd_row`, or None when a token row does not fit on chip.

    The program holds BT * NP * HP values (HP = next power of two >= h), CONTRACT_ROW_PER_THREAD = 64 per
    thread (num_warps = BT * NP * HP / 2048, at most 16). ptxas for sm_90 (tests/test_kernels_compile.py):
    n = 4, h = 7168 (4 x 8192 padded) -> 16 warps, 121-128 registers, no spills; n = 4, h = 4096 -> 8 warps,
    123-156 registers, no spills. Rows above CONTRACT_ROW_MAX_ELEMS = 32768 padded elements (n = 8 with
    h > 4096) would exceed the SM's registers and take the two-pass `_contract_fwd`.
    """
    NP, HP = p2(n), p2(h)
    row = NP * HP
    if row > CONTRACT_ROW_MAX_ELEMS:
        return None
    BT = 1
    while BT * 2 * row <= CONTRACT_ROW_MIN_ELEMS and triton.cdiv(T, BT * 2) >= MIN_PROGRAMS:
        BT *= 2
    num_warps = max(4, min(16, BT * row // (32 * CONTRACT_ROW_PER_THREAD)))
    return dict(BT=BT, NP=NP, HP=HP, num_warps=num_warps, num_stages=1)


def contract_bwd_row_meta(T: int, n: int, h: int) -> dict | None:
    """Launch config of `_contract_bwd_row` (the forward's), or None for the two-kernel backward.

    The backward also holds dy, the dx accumulator and a head_fn slice ([HP] each), so it fits in fewer
    cases than the forward. ptxas for sm_90, with and without the divisibility-by-16 specialisation: rows up
    to CONTRACT_BWD_ROW_MAX_ELEMS = 16384 padded elements (n = 4 with h <= 4096, n <= 2 with h <= 8192,
    n = 8 with h <= 2048) take 146-255 registers, no spills; 32768-element rows (n = 4, h = 7168 at 16 and
    32 warps; n = 8, h = 4096) spill 20-168 B, so they use `_contract_bwd_coef` + `_proj_bwd`.
    """
    meta = contract_row_meta(T, n, h)
    if meta is None or meta["NP"] * meta["HP"] > CONTRACT_BWD_ROW_MAX_ELEMS:
        return None
    return meta
