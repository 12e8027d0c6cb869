"""dsv4: declarative toolkit for DeepSeek-V4-style models on Megatron-Core."""

__version__ = "0.1.0"
