"""Everything dsv4 needs to run on megatron-core where megatron assumes something else.

- `device`: the one place that decides the device (CUDA or CPU); nothing else asks torch.
"""
