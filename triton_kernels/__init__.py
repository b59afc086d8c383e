"""Triton kernels (installed as pyquant.triton_kernels); imported lazily, never at pyquant import."""
