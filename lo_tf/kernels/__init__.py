"""Fused kernels of the learned-optimizer step (paper App. F): C++ CPU and CUDA custom ops."""
