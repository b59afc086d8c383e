"""W8A8 matmul: dynamic per-token int8 activations x per-channel int8 weights.

``w8a8_matmul(x, qw)`` quantizes each row of ``x`` to int8 with its own scale
(``max|x| / 127``), multiplies with the weight's signed codes in integer
arithmetic and rescales: ``y = (acc * x_scale) * w_scale + bias``, in
``x.dtype``. The weight must be ``Int(8, -1, symmetric=True)`` (per-channel
scales; codes are stored unsigned with the implicit zero point 128). The spec
is :func:`pyquant.ops.reference.w8a8_matmul_reference`; the result differs from
``qmatmul`` by the activation quantization error, which is the point: int8 x
int8 products run on the integer tensor cores.

One torch.library op, ``pyquant::w8a8_matmul`` (schema + fake kernel), chosen
by the same dispatch as the other ops: the CUDA kernel ("cuda_w8a8_gemm") where
built and verified, else the pure-torch reference (any device).
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from ..errors import FormatError
from ..formats import QuantizedWeight, format_from_spec
from ..validation import check_matmul_inputs
from . import reference
from .dispatch import register_kernel, select_kernel


@functools.lru_cache(maxsize=64)
def _fmt(spec: str):
    return format_from_spec(spec)


def _w8a8_format(fmt, device, m):
    return reference.is_w8a8_format(fmt)


register_kernel("w8a8_matmul", "reference", "reference_w8a8_matmul", _w8a8_format)(
    reference.w8a8_matmul_reference
)


@torch.library.custom_op("pyquant::w8a8_matmul", mutates_args=())
def w8a8_matmul_op(
    x: torch.Tensor, qdata: List[torch.Tensor], fmt: str, n: int, k: int, bias: Optional[torch.Tensor], kernel: str
) -> torch.Tensor:
    f = _fmt(fmt)
    x2 = x.reshape(-1, k)
    kern = select_kernel("w8a8_matmul", f, x.device, x2.shape[0], kernel)
    y = kern.fn(x2.contiguous(), qdata, f, (n, k), bias)
    return y.reshape(*x.shape[:-1], n)


@w8a8_matmul_op.register_fake
def _(x, qdata, fmt, n, k, bias, kernel):
    return x.new_empty((*x.shape[:-1], n))


def w8a8_matmul(
    x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, kernel: str = "auto"
) -> torch.Tensor:
    """``x @ W_hat.T + bias`` with ``x`` quantized to int8 per token; output in ``x.dtype``.

    ``qw`` must be an ``Int(8, -1, symmetric=True)`` weight. Any leading batch
    dims of ``x`` are kept. Not differentiable (an inference op).
    """
    if not isinstance(qw, QuantizedWeight):
        raise FormatError(f"expected a pyquant QuantizedWeight, got {type(qw).__name__}")
    if not reference.is_w8a8_format(qw.format):
        raise FormatError(
            f"w8a8_matmul needs an Int(8, group_size=-1, symmetric=True) weight without act_order, "
            f"got {qw.format.spec()}"
        )
    if not isinstance(kernel, str):
        raise FormatError(f"kernel must be a string, got {type(kernel).__name__}")
    n, k = qw.shape
    check_matmul_inputs(x, n, k, qw.device, bias)
    return torch.ops.pyquant.w8a8_matmul(x, qw.tensor_list(), qw.format.spec(), n, k, bias, kernel)


__all__ = ["w8a8_matmul"]
