"""Spec -> megatron ModuleSpecs: the decoder layer, this stage's block and this stage's MTP block.

The architecture is data: `streams = 1` is megatron's own TransformerLayer/MTP layer; `streams > 1`
swaps in MultiStreamTransformerLayer / MultiStreamMTPLayer with the same submodules.

Backends: CUDA + Transformer Engine -> megatron's TE layer spec; otherwise local megatron modules
(column/row parallel linears) with SP-taggable torch norms; on CPU the core attention is
SDPACoreAttention (megatron's DotProductAttention needs CUDA buffers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from dsv4cli.build.dsv4_specs import dsv4_layer_spec
from dsv4cli.spec.schema import Spec


@dataclass(frozen=True)
class Backend:
    """Which module implementations to use."""

    name: str  # "te" | "local"
    core_attention: type
    norm: type
    column_parallel_linear: type


def select_backend() -> Backend:
    """TE on CUDA when it loads; local megatron modules otherwise (SDPA core attention on CPU).
    The choice is dsv4cli.build.gpu_settings's (`GpuSettings.backend`)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from dsv4cli.build.gpu_settings import probe
    from dsv4cli.model.norms import SPNorm

    avail = probe()
    if avail.te:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TEDotProductAttention, TENorm

        return Backend("te", TEDotProductAttention, TENorm, TEColumnParallelLinear)
    if avail.cuda:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        return Backend("local", DotProductAttention, SPNorm, ColumnParallelLinear)
    from dsv4cli.model.sdpa_attention import SDPACoreAttention

    return Backend("local", SDPACoreAttention, SPNorm, ColumnParallelLinear)


def decoder_layer_spec(spec: Spec, backend: Optional[Backend] = None, grouped_gemm: Optional[bool] = None,
                       index: int = 0):
    """One decoder layer: megatron TransformerLayer (n = 1) or MultiStreamTransformerLayer (n > 1).

    grouped_gemm: TE grouped-GEMM experts (the config's `moe_grouped_gemm`; default: what
    gpu_settings decides for this machine). index: the layer's 0-based place among decoder layers
    then MTP depths, for DeepSeek-V4's per-layer attention kind and hash routing (dsv4_specs.py)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
        get_mlp_module_spec_for_backend,
    )
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from dsv4cli.model.multi_stream_layer import MultiStreamTransformerLayer

    backend = backend or select_backend()
    num_experts = spec.model.moe.num_experts if spec.model.moe is not None else None
    if backend.name == "te":
        # Grouped-GEMM experts (TEGroupedMLP) as transformer_config decides (gpu_settings): their
        # checkpoint keys are SequentialMLP's (`mlp.experts.experts.linear_fc1.weight`, expert axis).
        if grouped_gemm is None:
            from dsv4cli.build.gpu_settings import gpu_settings, probe

            grouped_gemm = gpu_settings(spec, probe()).grouped_gemm
        layer = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=grouped_gemm)
    else:
        # Checkpoint keys follow the TE spec: its dense layers fuse the norms into linear_qkv /
        # linear_fc1 (`*.layer_norm_weight`), its MoE layers keep `pre_mlp_layernorm` as a module.
        keys_map = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
        if num_experts is None:
            keys_map["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        layer = ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=backend.norm,
                self_attention=ModuleSpec(
                    module=SelfAttention,
                    params={"attn_mask_type": AttnMaskType.causal},
                    submodules=SelfAttentionSubmodules(
                        linear_qkv=ColumnParallelLinear,
                        core_attention=backend.core_attention,
                        linear_proj=RowParallelLinear,
                        q_layernorm=IdentityOp,
                        k_layernorm=IdentityOp,
                    ),
                ),
                self_attn_bda=get_bias_dropout_add,
                pre_mlp_layernorm=backend.norm,
                mlp=get_mlp_module_spec_for_backend(backend=LocalSpecProvider(), num_experts=num_experts),
                mlp_bda=get_bias_dropout_add,
                sharded_state_dict_keys_map=keys_map,
            ),
        )
    if spec.model.mhc.streams > 1:
        layer = replace(layer, module=MultiStreamTransformerLayer)  # mHC settings: from the config
    return dsv4_layer_spec(spec, layer, index, backend.norm)


def decoder_block_spec(spec: Spec, config, vp_stage: Optional[int] = None, backend: Optional[Backend] = None):
    """This pipeline stage's layers (pp_layout aware) + the final norm (the block class, and with it
    the contraction, follows config.mhc_streams: Dsv4GPTModel)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    backend = backend or select_backend()
    grouped = getattr(config, "moe_grouped_gemm", False)
    layers = [decoder_layer_spec(spec, backend, grouped, index) for index in stage_layer_indices(config, vp_stage)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=backend.norm)


def stage_layer_indices(config, vp_stage: Optional[int] = None) -> list[int]:
    """0-based global indices of the decoder layers this (virtual) pipeline stage builds, as
    megatron numbers them (its offset, pp_layout aware, .. + the count)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    return list(range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage)))


def mtp_block_spec(spec: Spec, config, vp_stage: Optional[int] = None, backend: Optional[Backend] = None):
    """MTP depths built on this stage (None when none): megatron's MTP layer (n = 1) or MultiStreamMTPLayer."""
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlockSubmodules,
        MultiTokenPredictionLayer,
        MultiTokenPredictionLayerSubmodules,
        get_mtp_num_layers_to_build,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec

    from dsv4cli.model.mtp import MultiStreamMTPLayer

    if spec.model.mtp.depth == 0 or get_mtp_num_layers_to_build(config, vp_stage=vp_stage) == 0:
        return None
    backend = backend or select_backend()
    module = MultiStreamMTPLayer if spec.model.mhc.streams > 1 else MultiTokenPredictionLayer
    grouped = getattr(config, "moe_grouped_gemm", False)
    layers = []
    for depth in range(spec.model.mtp.depth):  # MTP depth k's layer: index num_layers + k - 1
        submodules = MultiTokenPredictionLayerSubmodules(
            enorm=backend.norm,
            hnorm=backend.norm,
            eh_proj=backend.column_parallel_linear,
            transformer_layer=decoder_layer_spec(spec, backend, grouped, spec.model.num_layers + depth),
            layer_norm=backend.norm,
        )
        layers.append(ModuleSpec(module=module, submodules=submodules))
    return MultiTokenPredictionBlockSubmodules(layer_specs=layers)
