"""Keep a module's own mHC/contraction parameters in fp32 through `.bfloat16()`/`.half()`/`.to(dtype)`.

megatron's Float16Module casts the whole model with `.bfloat16()`; docs/design.md §2 wants mHC and
contraction parameters fp32 always (a bf16 `hc_head_base` moves the contraction weights by ~0.2%).
Device moves still apply.
"""

from __future__ import annotations

import torch


class KeepFp32Params:
    """Mixin for torch.nn.Module: after any `_apply`, floating params listed by `fp32_param_names()`
    (default: all of this module's parameters) are cast back to fp32."""

    def fp32_param_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        wanted = set(self.fp32_param_names())
        for name, p in self.named_parameters():
            if name in wanted and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        return result
