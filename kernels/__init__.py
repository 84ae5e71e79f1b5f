"""Fused mask kernels (Triton) and their torch reference; installed as fnscale.kernels."""
