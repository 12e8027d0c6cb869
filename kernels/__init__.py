"""mHC and output-contraction ops (installed as `dsv4cli.kernels`)."""
