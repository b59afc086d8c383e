"""torch.library definitions of pyquant's ops: schema, fake kernel, autograd.

Each op takes the packed tensors as a ``Tensor[]`` in the format's canonical
order plus the format's spec string, so one op serves every format and
torch.compile sees a single graph node per layer. The implementation is one
call to :func:`dispatch.select_kernel`.

The ops are declared with the low-level ``torch.library.Library`` API and one
``CompositeExplicitAutograd`` implementation rather than the ``custom_op``
decorator: the decorator's Python wrappers cost ~40 us per call, which is
more than a decode-time GEMV of a small layer takes (measured here: ~10 us vs
~48 us per call of an empty op).
"""
from __future__ import annotations

import functools

import torch

from ..formats import format_from_spec
from .dispatch import select_kernel

_LIB = torch.library.Library("pyquant", "DEF")
_LIB.define("dequantize(Tensor[] qdata, str fmt, int n, int k, ScalarType dtype, str kernel) -> Tensor")
_LIB.define("dequantize_out(Tensor[] qdata, str fmt, int n, int k, str kernel, Tensor(a!) out) -> ()")
_LIB.define("qmatmul(Tensor x, Tensor[] qdata, str fmt, int n, int k, Tensor? bias, str kernel) -> Tensor")
_LIB.define("pack(Tensor codes, str fmt, str kernel) -> Tensor")
_LIB.define("unpack(Tensor packed, str fmt, int n, int k, str kernel) -> Tensor")


@functools.lru_cache(maxsize=256)
def _fmt(spec: str):
    return format_from_spec(spec)


def _impl(name):
    def deco(fn):
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return fn

    return deco


@_impl("dequantize")
def dequantize_impl(qdata, fmt, n, k, dtype, kernel):
    f = _fmt(fmt)
    kern = select_kernel("dequantize", f, qdata[0].device, n, kernel)
    return kern.fn(list(qdata), f, (n, k), dtype)


@torch.library.register_fake("pyquant::dequantize")
def _(qdata, fmt, n, k, dtype, kernel):
    return qdata[0].new_empty((n, k), dtype=dtype)


@_impl("dequantize_out")
def dequantize_out_impl(qdata, fmt, n, k, kernel, out):
    """Writes into ``out``: kernels that declare ``writes_out`` decode straight
    into it (no fresh allocation, so no page faults on a reused buffer)."""
    f = _fmt(fmt)
    kern = select_kernel("dequantize", f, qdata[0].device, n, kernel)
    if getattr(kern.fn, "writes_out", False):
        kern.fn(list(qdata), f, (n, k), out.dtype, out=out)
    else:
        out.copy_(kern.fn(list(qdata), f, (n, k), out.dtype))


@torch.library.register_fake("pyquant::dequantize_out")
def _(qdata, fmt, n, k, kernel, out):
    return None


@_impl("qmatmul")
def qmatmul_impl(x, qdata, fmt, n, k, bias, kernel):
    f = _fmt(fmt)
    x2 = x.reshape(-1, k)
    kern = select_kernel("qmatmul", f, x.device, x2.shape[0], kernel)
    y = kern.fn(x2.contiguous(), list(qdata), f, (n, k), bias)
    return y.reshape(*x.shape[:-1], n)


@torch.library.register_fake("pyquant::qmatmul")
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
        w = torch.ops.pyquant.dequantize(qdata, ctx.fmt, ctx.n, ctx.k, grad.dtype, ctx.kernel)
        grad_x = (grad @ w).to(ctx.x_dtype)
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, ctx.n).sum(0).to(ctx.bias_dtype)
    return grad_x, [None] * len(qdata), None, None, None, grad_bias, None


torch.library.register_autograd("pyquant::qmatmul", _qmatmul_backward, setup_context=_qmatmul_setup_context)


def _qmatmul_vmap(info, in_dims, x, qdata, fmt, n, k, bias, kernel):
    # qmatmul already takes any leading dims of x, so a vmapped x is just one
    # more leading dim; a batch of different weights is not a qmatmul.
    x_dim, qdata_dims, _, _, _, bias_dim, _ = in_dims
    if any(d is not None for d in qdata_dims):
        raise NotImplementedError("pyquant.qmatmul cannot vmap over the packed weight; vmap over x only")
    x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(info.batch_size, *x.shape)
    if bias_dim is None:
        return torch.ops.pyquant.qmatmul(x, qdata, fmt, n, k, bias, kernel), 0
    y = torch.ops.pyquant.qmatmul(x, qdata, fmt, n, k, None, kernel)
    b = bias.movedim(bias_dim, 0)
    return y + b.reshape(b.shape[0], *([1] * (y.dim() - 2)), n).to(y.dtype), 0


torch.library.register_vmap("pyquant::qmatmul", _qmatmul_vmap)


@_impl("pack")
def pack_impl(codes, fmt, kernel):
    f = _fmt(fmt)
    kern = select_kernel("pack", f, codes.device, 1, kernel)
    return kern.fn(codes, f)


@torch.library.register_fake("pyquant::pack")
def _(codes, fmt, kernel):
    f = _fmt(fmt)
    shape = (codes.shape[0], codes.shape[1])
    (tshape, dtype) = f.tensor_specs(shape)["qweight"]
    return codes.new_empty(tshape, dtype=dtype)


@_impl("unpack")
def unpack_impl(packed, fmt, n, k, kernel):
    f = _fmt(fmt)
    kern = select_kernel("unpack", f, packed.device, 1, kernel)
    return kern.fn(packed, f, (n, k))


@torch.library.register_fake("pyquant::unpack")
def _(packed, fmt, n, k, kernel):
    return packed.new_empty((n, k), dtype=torch.uint8)
