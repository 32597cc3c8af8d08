"""Triton GPU kernels, one kernel family per module. The models never import them: `deepfleet.models.attention`
is the one interface, and it dispatches here on CUDA (the plain-PyTorch reference runs on CPU)."""
