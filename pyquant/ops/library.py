"""torch.library definitions of pyquant's ops: schema, fake kernel, autograd.

Each op takes the packed tensors as a ``Tensor[]`` in the format's canonical
order plus the format's spec string, so one op serves every format and
torch.compile sees a single graph node per layer. The implementation is one
call to :func:`dispatch.select_kernel`.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from ..formats import format_from_spec
from .dispatch import select_kernel


@functools.lru_cache(maxsize=256)
def _fmt(spec: str):
    return format_from_spec(spec)


@torch.library.custom_op("pyquant::dequantize", mutates_args=())
def dequantize_op(
    qdata: List[torch.Tensor], fmt: str, n: int, k: int, dtype: torch.dtype, kernel: str
) -> torch.Tensor:
    f = _fmt(fmt)
    kern = select_kernel("dequantize", f, qdata[0].device, n, kernel)
    return kern.fn(qdata, f, (n, k), dtype)


@dequantize_op.register_fake
def _(qdata, fmt, n, k, dtype, kernel):
    return qdata[0].new_empty((n, k), dtype=dtype)


@torch.library.custom_op("pyquant::qmatmul", mutates_args=())
def qmatmul_op(
    x: torch.Tensor, qdata: List[torch.Tensor], fmt: str, n: int, k: int, bias: Optional[torch.Tensor], kernel: str
) -> torch.Tensor:
    f = _fmt(fmt)
    x2 = x.reshape(-1, k)
    kern = select_kernel("qmatmul", f, x.device, x2.shape[0], kernel)
    y = kern.fn(x2.contiguous(), qdata, f, (n, k), bias)
    return y.reshape(*x.shape[:-1], n)


@qmatmul_op.register_fake
def _(x, qdata, fmt, n, k, bias, kernel):
    return x.new_empty((*x.shape[:-1], n))


def _qmatmul_setup_context(ctx, inputs, output):
    x, qdata, fmt, n, k, bias, kernel = inputs
    ctx.fmt, ctx.n, ctx.k, ctx.kernel = fmt, n, k, kernel
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(*qdata)


def _qmatmul_backward(ctx, grad):
    # The base weight is frozen (QLoRA): only x and bias get gradients.
    qdata = list(ctx.saved_tensors)
    grad_x = None
    if ctx.needs_input_grad[0]:
        w = dequantize_op(qdata, ctx.fmt, ctx.n, ctx.k, grad.dtype, ctx.kernel)
        grad_x = (grad @ w).to(ctx.x_dtype)
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, ctx.n).sum(0).to(ctx.bias_dtype)
    return grad_x, [None] * len(qdata), None, None, None, grad_bias, None


torch.library.register_autograd("pyquant::qmatmul", _qmatmul_backward, setup_context=_qmatmul_setup_context)


@torch.library.custom_op("pyquant::pack", mutates_args=())
def pack_op(codes: torch.Tensor, fmt: str, kernel: str) -> torch.Tensor:
    f = _fmt(fmt)
    kern = select_kernel("pack", f, codes.device, 1, kernel)
    return kern.fn(codes, f)


@pack_op.register_fake
def _(codes, fmt, kernel):
    f = _fmt(fmt)
    shape = (codes.shape[0], codes.shape[1])
    (tshape, dtype) = f.tensor_specs(shape)["qweight"]
    return codes.new_empty(tshape, dtype=dtype)


@torch.library.custom_op("pyquant::unpack", mutates_args=())
def unpack_op(packed: torch.Tensor, fmt: str, n: int, k: int, kernel: str) -> torch.Tensor:
    f = _fmt(fmt)
    kern = select_kernel("unpack", f, packed.device, 1, kernel)
    return kern.fn(packed, f, (n, k))


@unpack_op.register_fake
def _(packed, fmt, n, k, kernel):
    return packed.new_empty((n, k), dtype=torch.uint8)
