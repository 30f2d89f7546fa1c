"""Triton kernels of resfused, installed as resfused.triton_kernels (one module per fused op)."""
