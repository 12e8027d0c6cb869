"""Spec -> Dsv4TransformerConfig (the one place that maps spec fields to megatron knobs and to the
DSv4 settings the model's modules read: mHC, contraction, parameter placement)."""

from __future__ import annotations

from typing import Optional

from dsv4cli.spec.estimate import padded_vocab_size  # noqa: F401 (re-exported by dsv4cli.build)
from dsv4cli.spec.layout import ParallelDims
from dsv4cli.spec.rules import UnsupportedSpecError, check_supported  # noqa: F401 (the one list: spec/rules.py)
from dsv4cli.spec.schema import Spec

# train.recompute list entries that are megatron selective-recompute modules ("mhc" is ours).
_MEGATRON_RECOMPUTE_MODULES = {"core_attn": "core_attn", "mlp": "mlp", "moe": "moe", "layernorm": "layernorm"}


def virtual_stages(spec: Spec) -> int:
    """Virtual pipeline stages per pipeline rank (from parallel.vpp or the pp_layout's stage count)."""
    par = spec.parallel
    if par.pp_layout:
        from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

        return max(1, PipelineParallelLayerLayout.get_num_stages_from_str(par.pp_layout) // par.pp)
    return par.vpp


def recompute_settings(spec: Spec) -> tuple[dict, bool]:
    """train.recompute -> (TransformerConfig kwargs, recompute the mHC mappings?)."""
    rc = spec.train.recompute
    if rc == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), False
    modules = [_MEGATRON_RECOMPUTE_MODULES[m] for m in rc if m in _MEGATRON_RECOMPUTE_MODULES]
    kwargs = dict(recompute_granularity="selective", recompute_modules=modules) if modules else {}
    return kwargs, "mhc" in rc


def transformer_config(spec: Spec, world_size: Optional[int] = None):
    """Spec -> Dsv4TransformerConfig, a megatron TransformerConfig (the decoder-layer config;
    hidden_size is h) that also carries model.mhc / model.contraction (dsv4cli/model/config.py).

    world_size, when given, is checked against the process grids (ParallelDims.check) so a bad
    layout fails here with the numbers rather than deep inside megatron.
    """
    import torch
    import torch.nn.functional as F

    from dsv4cli.build.dsv4_specs import uses_dsv4_router
    from dsv4cli.build.gpu_settings import gpu_settings, probe
    from dsv4cli.compat import device
    from dsv4cli.model.config import Dsv4TransformerConfig

    check_supported(spec)
    m, par, tr = spec.model, spec.parallel, spec.train
    if world_size is not None:
        ParallelDims.of(spec, world_size).check()
    on_cpu = device.on_cpu()  # CPU initialisation (the fast paths come from gpu_settings)
    bf16 = tr.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    recompute_kwargs, recompute_mhc = recompute_settings(spec)
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=virtual_stages(spec) if virtual_stages(spec) > 1 else None,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.etp,
        sequence_parallel=par.sequence_parallel,
        pipeline_model_parallel_layout=par.pp_layout,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=bf16,
        mtp_num_layers=m.mtp.depth if m.mtp.depth > 0 else None,
        mtp_loss_scaling_factor=m.mtp.loss_scale,
        use_cpu_initialization=on_cpu,
        **recompute_kwargs,
        mhc_streams=m.mhc.streams,
        mhc_sinkhorn_iterations=m.mhc.sinkhorn_iterations,
        mhc_gating_init=m.mhc.gating_init,
        mhc_eps=m.mhc.eps,
        mhc_recompute=recompute_mhc,
        contraction_mode=m.contraction.mode,
        contraction_eps=m.contraction.eps,
        # megatron allocates its parameters on the current GPU unless use_cpu_initialization; ours follow
        param_device=None if on_cpu else "cuda",
    )
    if m.moe is not None:
        moe = m.moe
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            moe_shared_expert_intermediate_size=(
                moe.num_shared_experts * moe.expert_ffn_hidden_size if moe.num_shared_experts else None
            ),
            # "sqrtsoftplus": megatron's routers never see it (DeepSeek-V4's routers compute it;
            # dsv4_specs.py builds them); dsv4cli.model.dsv4.expert_bias reads it
            moe_router_score_function=moe.score_function,
            # megatron refuses softmax-after-top-k for k = 1 (the weight would always be 1, no gradient)
            moe_router_pre_softmax=moe.top_k == 1 and moe.score_function == "softmax",
            moe_router_topk_scaling_factor=moe.routed_scaling_factor if moe.routed_scaling_factor != 1.0 else None,
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            # read by dsv4cli.model.dsv4.expert_bias (megatron's own update needs sigmoid scores)
            moe_router_bias_update_rate=moe.expert_bias_update_rate,
            moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
            moe_token_dispatcher_type="alltoall",
        )
        if moe.swiglu_limit > 0:  # routed and shared experts (every MLP of the model is an MoE layer)
            from dsv4cli.model.dsv4.experts import clamped_swiglu_config

            kwargs.update(clamped_swiglu_config(moe.swiglu_limit))
    if m.attention is not None or uses_dsv4_router(spec):
        # DeepSeek-V4's layers differ (attention kind, compression ratio, hash router): checkpoint keys
        # per layer, `decoder.layers.{i}.<rest>`, not stacked over a leading layer dimension
        kwargs["hetereogenous_dist_checkpoint"] = True
    # Fusions, grouped-GEMM experts and CPU workarounds: what this machine has installed.
    kwargs.update(gpu_settings(spec, probe(), virtual_stages=virtual_stages(spec)).config)
    return Dsv4TransformerConfig(**kwargs)
