"""Dtype codes shared with the C++ side (csrc/include/pyquant/common.h)."""
import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def ptr(t) -> int:
    """Data pointer of an optional tensor (0 for None), for the C++ entry points."""
    return 0 if t is None else t.data_ptr()
