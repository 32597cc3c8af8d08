"""Triton GPU kernels, one kernel family per module. Each family has one caller that dispatches on the device and
keeps the plain-PyTorch reference for CPU: attention in deepfleet.models.attention, the FP8 GEMM in
deepfleet.quant.linear, the fused MoE and the MoE routing in deepfleet.models.deepseek_v3."""
