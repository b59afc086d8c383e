"""The pure-torch spec of the weight ops: dequantize, qmatmul, pack, unpack.

Every backend (CPU C++, Triton, CUDA) is tested against these functions on the
same inputs. They favour clarity over speed, run on any device, and compute in
fp32: ``dequantize`` returns exactly the fp32 values a kernel must produce
(then cast to the requested dtype), ``qmatmul`` is ``x @ W_hat.T + bias``
accumulated in fp32 and cast to the activation dtype.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ...formats import Format


def _named(fmt: Format, qdata: List[torch.Tensor], shape) -> dict:
    return dict(zip(fmt.tensor_specs(tuple(shape)).keys(), qdata))


def dequantize_fp32(fmt: Format, qdata: List[torch.Tensor], shape) -> torch.Tensor:
    """The fp32 weight ``(N, K)`` that ``qdata`` encodes: the format's own decode,
    after checking the tensors against the format (the op takes any Tensor[])."""
    return fmt.dequantize(_named(fmt, qdata, shape), shape)


def dequantize(qdata: List[torch.Tensor], fmt: Format, shape, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_fp32(fmt, qdata, shape).to(dtype)


def qmatmul(
    x: torch.Tensor, qdata: List[torch.Tensor], fmt: Format, shape, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    w = dequantize_fp32(fmt, qdata, shape)
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def pack(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    return fmt.pack_codes(codes)


def unpack(packed: torch.Tensor, fmt: Format, shape) -> torch.Tensor:
    return fmt.unpack_codes(packed, tuple(shape))
