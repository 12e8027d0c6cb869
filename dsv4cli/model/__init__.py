"""dsv4cli.model: Megatron-Core modules for DSv4-style models (imports nothing at package import).

sdpa_attention, norms, hyper_connection (mHC per sub-layer),
contraction (learned/average), multi_stream_layer, multi_stream_block, mtp (MTP depth with mHC),
gpt (Dsv4GPTModel), fp32_params, inventory (parameter list, folded module tree). docs/model.md.
The CPU workarounds for megatron-core live in dsv4cli.compat.
"""
