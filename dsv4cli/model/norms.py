"""RMSNorm/LayerNorm on torch.nn modules whose weights are tagged for sequence parallelism.

megatron's `WrappedTorchNorm` refuses `sequence_parallel=True`. Under sequence parallelism a
norm weight sees only this rank's sequence shard, so its gradient must be all-reduced over the
tensor-parallel group; megatron's `finalize_model_grads` does that for every parameter with
`param.sequence_parallel = True`. Used for block, layer and MTP norms on the local (non-TE) path.
Like TE's norms, the weight is created in `config.params_dtype` on megatron's parameter device.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


class SPNorm:
    """Factory with megatron's norm signature: (config, hidden_size, eps) -> torch norm module [.., h]."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        from dsv4cli.model.hyper_connection import param_device

        factory = dict(device=param_device(config), dtype=config.params_dtype)
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, **factory)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, **factory)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for p in norm.parameters():
            setattr(p, "sequence_parallel", bool(config.sequence_parallel))
        return norm
