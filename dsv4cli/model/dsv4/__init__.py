"""DeepSeek-V4's own blocks (attention with compression, sqrtsoftplus / hash-routed MoE) as Megatron-Core modules."""
