"""SwiGLU with DeepSeek-V4's clamp, for routed and shared experts: megatron-core's unfused GLU path.

DeepSeek-V4 clamps the two halves of fc1's output [gate; up] ([..., 2f]) before the SwiGLU:

    gate = min(gate, limit)            (no lower bound)
    up   = clamp(up, -limit, limit)
    out  = silu(gate) * up             [..., f]

megatron-core 0.16.1's MLP (shared experts, SequentialMLP's experts) and grouped experts compute
exactly this on their unfused GLU path (`glu` in mlp.py / experts.py clamps x_glu to max=v and
x_linear to [-v, v], then act(x_glu) * (x_linear + glu_linear_offset)) with the settings below.
The fused SwiGLU kernels (`bias_activation_fusion`) and TE's activation functions skip the clamp,
so a clamped model must run without them: `check_clamped_swiglu` refuses such a config.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F


def clamped_swiglu_config(limit: Optional[float]) -> dict:
    """TransformerConfig settings for SwiGLU with DeepSeek-V4's clamp at `limit` (None: no clamp)."""
    return dict(gated_linear_unit=True, activation_func=F.silu, glu_linear_offset=0.0,
                activation_func_clamp_value=limit, bias_activation_fusion=False, use_te_activation_func=False)


def check_clamped_swiglu(config) -> None:
    """Raise ValueError when `config` asks for a clamp that its activation path would skip."""
    if config.activation_func_clamp_value is None:
        return
    fused = [name for name in ("bias_activation_fusion", "use_te_activation_func") if getattr(config, name)]
    if fused:
        raise ValueError(f"the SwiGLU clamp ({config.activation_func_clamp_value}) needs megatron's unfused GLU "
                         f"path, but {' and '.join(fused)} is set")
    if not config.gated_linear_unit or config.activation_func is not F.silu or config.glu_linear_offset != 0.0:
        raise ValueError("the SwiGLU clamp needs gated_linear_unit=True, activation_func=F.silu, glu_linear_offset=0")
