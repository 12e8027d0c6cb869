"""Fused Triton kernels for the mHC and output-contraction ops, each wrapped in a torch.autograd.Function.

One module per op, every kernel computing in fp32 (T tokens, K = n*h flattened width, M = n*n + 2n mapping rows):
- `projection`: `_proj_sumsq_fwd` (one pass over x -> raw x @ W^T [T, M] and rsqrt(mean(x^2) + eps) [T]; the
  RMS is applied after the matmul) and `_proj_bwd` (dx = dmix @ W + c * x (+ the contraction's pre * dy) and
  per-split partial dW = dmix^T x), shared by the mappings and the contraction;
- `sinkhorn_core`: the Sinkhorn jit core (the backward recomputes the iterations once from the logits, keeping only
  each step's n divisors in a small scratch, then runs the steps in reverse) and the standalone op;
- `mapping`: `_mhc_coef_fwd` / `_mhc_coef_bwd`: gating, bias, sigmoids and Sinkhorn in one kernel;
- `aggregate`: u = sum_i w_i x_i (also the mean contraction with w = 1/n);
- `post_res`: x'_k = h_post[k] f + sum_j h_res[j, k] x_j in one pass, forward and backward;
- `contraction`: the learned contraction (projection, RMS, sigmoid and the weighted stream sum in one kernel,
  whole token rows on chip when they fit, else two passes);
- `launch`: tuning constants, block sizes and launch configs of every kernel, input checks.
Under TRITON_INTERPRET=1 (set before this package is imported) they run on CPU tensors.
"""

from __future__ import annotations

from . import aggregate, contraction, launch, mapping, post_res, projection, sinkhorn_core
from .aggregate import average_output_contract, mhc_aggregate
from .contraction import learned_output_contract
from .launch import INTERPRETED
from .mapping import mhc_mappings
from .post_res import mhc_post_res
from .sinkhorn_core import sinkhorn

__all__ = ["INTERPRETED", "KERNELS", "average_output_contract", "learned_output_contract", "mhc_aggregate",
           "mhc_mappings", "mhc_post_res", "sinkhorn"]  # fmt: skip

# Every launched kernel by name (tests/test_kernels_compile.py compiles each one for sm_90).
KERNELS = {
    "_proj_sumsq_fwd": projection._proj_sumsq_fwd,
    "_proj_bwd": projection._proj_bwd,
    "_mhc_coef_fwd": mapping._mhc_coef_fwd,
    "_mhc_coef_bwd": mapping._mhc_coef_bwd,
    "_sinkhorn_fwd": sinkhorn_core._sinkhorn_fwd,
    "_sinkhorn_bwd": sinkhorn_core._sinkhorn_bwd,
    "_aggregate_fwd": aggregate._aggregate_fwd,
    "_aggregate_bwd": aggregate._aggregate_bwd,
    "_post_res_fwd": post_res._post_res_fwd,
    "_post_res_bwd": post_res._post_res_bwd,
    "_contract_fwd": contraction._contract_fwd,
    "_contract_fwd_row": contraction._contract_fwd_row,
    "_contract_bwd_row": contraction._contract_bwd_row,
    "_contract_bwd_coef": contraction._contract_bwd_coef,
}
