"""Inference and interoperability: `dsv4 generate` (generate.py) and `dsv4 import-hf` (HF DeepSeek-V4
directories -> a dsv4 checkpoint and spec; hf_config.py, hf_names.py, safetensors_io.py, import_hf.py)."""
