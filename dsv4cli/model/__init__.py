"""dsv4cli.model: Megatron-Core modules for DSv4-style models (imports nothing at package import).

config (Dsv4TransformerConfig: the DSv4 settings every module reads), sdpa_attention, norms,
hyper_connection (mHC per sub-layer), contraction (learned/average), multi_stream_layer,
multi_stream_block, mtp (MTP depth with mHC), gpt (Dsv4GPTModel), init_seed (per-unit
initialisation), fp32_params, inventory (parameter list, folded module tree); dsv4 (DeepSeek-V4's
own attention and MoE blocks). docs/model.md. The CPU workarounds for megatron-core live in
dsv4cli.compat.
"""
