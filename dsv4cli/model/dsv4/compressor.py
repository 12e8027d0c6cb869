"""KV compressors of DeepSeek-V4: every `ratio` tokens become one gated-pooled, normed, rotated entry.

    x [s, b, h] --linear_kv--> c [s, b, k*d]      --split into windows of `ratio` tokens-->
              --linear_gate--> z [s, b, k*d] + position_bias [ratio, k*d]
    entry w = sum over its slots of softmax_slots(z) * c      [n = s // ratio, b, d]
            -> RMSNorm -> RoPE at position w * ratio          (trailing tokens of an unfinished window wait)

- non-overlapping (k = 1; heavily compressed attention): entry w pools the `ratio` tokens of window w.
- overlapping (k = 2; compressed sparse attention and its indexer): each token writes two series,
  Ca = c[..., :d] (for the next window's entry) and Cb = c[..., d:] (for its own window's entry);
  entry w pools Ca of window w-1 and Cb of window w over 2 * ratio slots (window 0 has no
  predecessor: those slots get softmax weight 0).

Entry w summarises tokens up to (w + 1) * ratio - 1, so query t may see it only when
w < (t + 1) // ratio (`compressed_causal_mask`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from dsv4cli.model.dsv4.attention_settings import RopeSettings
from dsv4cli.model.dsv4.norm import RMSNorm
from dsv4cli.model.dsv4.rope import Rotation
from dsv4cli.model.fp32_params import KeepFp32Params
from dsv4cli.model.hyper_connection import param_device

# ours -> (DeepSeek's / the safetensors file's name, HF transformers' module name)
COMPRESSOR_TENSOR_NAMES = {
    "linear_kv.weight": ("wkv.weight", "kv_proj.weight"),
    "linear_gate.weight": ("wgate.weight", "gate_proj.weight"),
    "position_bias": ("ape", "position_bias"),
    "norm.weight": ("norm.weight", "kv_norm.weight"),
}


def prefix_names(
    names: dict[str, tuple[str, str]], ours: str, deepseek: str, hf: str
) -> dict[str, tuple[str, str]]:
    """A child module's tensor-name map seen from its parent: each side's prefix put in front."""
    return {ours + k: (deepseek + ds, hf + hf_name) for k, (ds, hf_name) in names.items()}


def compressed_causal_mask(seq_len: int, n_entries: int, ratio: int, device=None) -> Tensor:
    """[s, n] bool: query t may see compressed entry w (w < (t + 1) // ratio, its window is complete)."""
    ready = (torch.arange(seq_len, device=device) + 1) // ratio
    return torch.arange(n_entries, device=device)[None, :] < ready[:, None]


def linear_weight(config: TransformerConfig, out_features: int, in_features: int, init=None) -> torch.nn.Linear:
    """A bias-free [out, in] linear in config.params_dtype, initialised with megatron's init method."""
    layer = torch.nn.Linear(
        in_features, out_features, bias=False, device=param_device(config), dtype=config.params_dtype
    )
    with torch.no_grad():
        (init or config.init_method)(layer.weight)
    return layer


class Dsv4Compressor(KeepFp32Params, MegatronModule):
    """x [s, b, h] -> compressed entries [s // ratio, b, head_dim] (see the module docstring).
    `position_bias` stays fp32 through `.bfloat16()`."""

    def __init__(
        self,
        config: TransformerConfig,
        head_dim: int,
        ratio: int,
        overlap: bool,
        rope: RopeSettings,
        rope_dim: int,
    ):
        super().__init__(config=config)
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        self.rope, self.rope_dim = rope, rope_dim
        width = (2 if overlap else 1) * head_dim
        self.linear_kv = linear_weight(config, width, config.hidden_size)
        self.linear_gate = linear_weight(config, width, config.hidden_size)
        # fp32 like HF/DeepSeek; zero-initialised as HF does
        self.position_bias = torch.nn.Parameter(
            torch.zeros(ratio, width, dtype=torch.float32, device=param_device(config))
        )
        self.norm = RMSNorm(head_dim, config.layernorm_epsilon, device=param_device(config))

    def fp32_param_names(self) -> list[str]:
        return ["position_bias"]

    def forward(self, hidden_states: Tensor) -> Tensor:
        """[s, b, h] -> [n, b, head_dim] with n = s // ratio (n may be 0)."""
        s, b, _ = hidden_states.shape
        n, r, d = s // self.ratio, self.ratio, self.head_dim
        if n == 0:
            return hidden_states.new_zeros(0, b, d)
        usable = hidden_states[: n * r]
        kv = self.linear_kv(usable).view(n, r, b, -1)
        gate = self.linear_gate(usable).view(n, r, b, -1) + self.position_bias[None, :, None, :]
        if self.overlap:
            # slots [0, r): Ca of the previous window; slots [r, 2r): Cb of this window
            prev_kv = torch.cat([kv.new_zeros(1, r, b, d), kv[:-1, ..., :d]], dim=0)
            prev_gate = torch.cat([gate.new_full((1, r, b, d), float("-inf")), gate[:-1, ..., :d]], dim=0)
            kv = torch.cat([prev_kv, kv[..., d:]], dim=1)
            gate = torch.cat([prev_gate, gate[..., d:]], dim=1)
        weights = gate.softmax(dim=1, dtype=torch.float32).to(kv.dtype)
        pooled = self.norm((kv * weights).sum(dim=1))  # [n, b, d]
        positions = torch.arange(n, device=pooled.device) * r
        return Rotation(self.rope, self.rope_dim, positions).rotate(pooled)
