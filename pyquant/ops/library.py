"""torch.library definitions of every pyquant op: schema, fake kernel, autograd.

The weight ops take the packed tensors as a ``Tensor[]`` in the format's
canonical order plus the format's spec string, so one op serves every format
and torch.compile sees a single graph node per layer. The solver ops
(``gptq_block_update``, ``hqq_solve``, ``hqq_solve_integer_zero``,
``kquant_quantize``) take plain tensors and numbers. Every implementation is one
call to :func:`dispatch.select_kernel`, and every op passes
``torch.library.opcheck`` (tests/ops/test_opcheck.py).

The ops are declared with the low-level ``torch.library.Library`` API and one
``CompositeExplicitAutograd`` implementation rather than the ``custom_op``
decorator: the decorator's Python wrappers cost ~40 us per call, which is
more than a decode-time GEMV of a small layer takes (measured here: ~10 us vs
~48 us per call of an empty op).
"""
from __future__ import annotations

import functools

import torch

from ..errors import KernelUnavailableError, ShapeError
from ..formats import GGUF, format_from_spec
from ..validation import check_last_dim
from . import plans
from .dispatch import select_kernel
from .reference.lora import lowrank_input

_LIB = torch.library.Library("pyquant", "DEF")
_LIB.define("dequantize(Tensor[] qdata, str fmt, int n, int k, ScalarType dtype, str kernel) -> Tensor")
_LIB.define("dequantize_out(Tensor[] qdata, str fmt, int n, int k, str kernel, Tensor(a!) out) -> ()")
_LIB.define("qmatmul(Tensor x, Tensor[] qdata, str fmt, int n, int k, Tensor? bias, str kernel) -> Tensor")
_LIB.define("pack(Tensor codes, str fmt, str kernel) -> Tensor")
_LIB.define("unpack(Tensor packed, str fmt, int n, int k, str kernel) -> Tensor")
_LIB.define("w8a8_matmul(Tensor x, Tensor[] qdata, str fmt, int n, int k, Tensor? bias, str kernel) -> Tensor")
_LIB.define(
    "gptq_block_update(Tensor(a!) W, Tensor Hinv, Tensor scale, Tensor zero, int start, int stop, int group_len, "
    "int maxq, Tensor(b!) codes_out, Tensor(c!) err_out, str kernel) -> ()"
)
_HQQ_OUT = "(Tensor codes, Tensor scales, Tensor zeros, Tensor err, Tensor iters)"
_LIB.define(
    "hqq_solve(Tensor w, int bits, int group, ScalarType scale_dtype, int iters, float lp_norm, float beta, "
    f"float kappa, bool early_stop, str kernel) -> {_HQQ_OUT}"
)
_LIB.define(
    "hqq_solve_integer_zero(Tensor w, int bits, int group, ScalarType scale_dtype, float zero_slack, int iters, "
    f"float lp_norm, float beta, float kappa, bool early_stop, str kernel) -> {_HQQ_OUT}"
)
_LIB.define("kquant_quantize(Tensor x, str type, Tensor? imatrix, str kernel) -> Tensor")
# QLoRA: the base layer plus the low-rank adapter path in one op (returns y and
# the r-wide x_lora @ A.T the backward reuses), and the product with W_hat that
# every quantized linear's backward needs.
_LIB.define(
    "lora_qmatmul(Tensor x, Tensor[] qdata, str fmt, int n, int k, Tensor? bias, Tensor lora_A, Tensor lora_B, "
    "float scale, Tensor? x_lora, str kernel) -> (Tensor, Tensor)"
)
_LIB.define("qmatmul_transposed(Tensor grad, Tensor[] qdata, str fmt, int n, int k, str kernel) -> Tensor")


@functools.lru_cache(maxsize=256)
def _fmt(spec: str):
    return format_from_spec(spec)


@functools.lru_cache(maxsize=None)
def _gguf(type_name: str):
    return GGUF(type_name)


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


def _linear(op, x, qdata, fmt, n, k, bias, kernel):
    """A kernel of ``op`` on x flattened to (M, K); any leading dims come back."""
    f = _fmt(fmt)
    x2 = x.reshape(-1, k)
    kern = select_kernel(op, f, x.device, x2.shape[0], kernel, shape=(n, k))
    y = kern.fn(x2.contiguous(), list(qdata), f, (n, k), bias)
    return y.reshape(*x.shape[:-1], n)


def _linear_fake(x, qdata, fmt, n, k, bias, kernel):
    return x.new_empty((*x.shape[:-1], n))


@_impl("qmatmul")
def qmatmul_impl(x, qdata, fmt, n, k, bias, kernel):
    # the weight's launch plans (ops/plans.py), as the eager entry points use them
    return plans.run_op(x, qdata, _fmt(fmt), (n, k), bias, kernel)


torch.library.register_fake("pyquant::qmatmul")(_linear_fake)


def _qmatmul_setup_context(ctx, inputs, output):
    x, qdata, fmt, n, k, bias, kernel = inputs
    ctx.fmt, ctx.n, ctx.k, ctx.kernel = fmt, n, k, kernel
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(*qdata)


def _backward_kernel(ctx, grad) -> str:
    """The forward's ``kernel=`` for the backward's ``qmatmul_transposed`` when
    that backend has a kernel for it, else "auto" (e.g. a forward forced onto
    CUDA C++, which has no transposed kernel): forcing the forward must not
    make its backward fail."""
    if ctx.kernel == "auto":
        return "auto"
    try:
        select_kernel("qmatmul_transposed", _fmt(ctx.fmt), grad.device, grad.numel() // max(ctx.n, 1), ctx.kernel)
    except KernelUnavailableError:
        return "auto"
    return ctx.kernel


def _grad_input(ctx, grad, qdata):
    """``grad @ W_hat`` (..., K) in grad's dtype, never W_hat in float."""
    return torch.ops.pyquant.qmatmul_transposed(grad, qdata, ctx.fmt, ctx.n, ctx.k, _backward_kernel(ctx, grad))


def _qmatmul_backward(ctx, grad):
    # The base weight is frozen (QLoRA): only x and bias get gradients.
    qdata = list(ctx.saved_tensors)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input(ctx, grad, qdata).to(ctx.x_dtype)
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


# --- QLoRA ------------------------------------------------------------------------
@_impl("qmatmul_transposed")
def qmatmul_transposed_impl(grad, qdata, fmt, n, k, kernel):
    f = _fmt(fmt)
    check_last_dim("grad", grad, n, "out_features")
    g2 = grad.reshape(-1, n)
    kern = select_kernel("qmatmul_transposed", f, grad.device, g2.shape[0], kernel)
    out = kern.fn(g2.contiguous(), list(qdata), f, (n, k))
    return out.reshape(*grad.shape[:-1], k)


@torch.library.register_fake("pyquant::qmatmul_transposed")
def _(grad, qdata, fmt, n, k, kernel):
    return grad.new_empty((*grad.shape[:-1], k))


def _qmatmul_transposed_setup_context(ctx, inputs, output):
    _, qdata, ctx.fmt, ctx.n, ctx.k, ctx.kernel = inputs
    ctx.save_for_backward(*qdata)


def _qmatmul_transposed_backward(ctx, grad):
    # linear in its input: the gradient of g @ W_hat is grad @ W_hat.T, a qmatmul
    qdata = list(ctx.saved_tensors)
    grad_g = None
    if ctx.needs_input_grad[0]:
        grad_g = torch.ops.pyquant.qmatmul(grad, qdata, ctx.fmt, ctx.n, ctx.k, None, ctx.kernel)
    return grad_g, [None] * len(qdata), None, None, None, None


torch.library.register_autograd(
    "pyquant::qmatmul_transposed", _qmatmul_transposed_backward, setup_context=_qmatmul_transposed_setup_context
)


@_impl("lora_qmatmul")
def lora_qmatmul_impl(x, qdata, fmt, n, k, bias, lora_A, lora_B, scale, x_lora, kernel):
    f = _fmt(fmt)
    check_last_dim("x", x, k, "in_features")
    if x_lora is not None:
        check_last_dim("x_lora", x_lora, k, "in_features")
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ShapeError(f"lora_A must be (r, in_features={k}), got shape {tuple(lora_A.shape)}")
    x2 = x.reshape(-1, k)
    xa = lowrank_input(x2 if x_lora is None else x_lora.reshape(-1, k), lora_A)
    kern = select_kernel("lora_qmatmul", f, x.device, x2.shape[0], kernel)
    y = kern.fn(x2.contiguous(), list(qdata), f, (n, k), bias, xa, lora_B, scale)
    lead = x.shape[:-1]
    return y.reshape(*lead, n), xa.reshape(*lead, lora_A.shape[0])


@torch.library.register_fake("pyquant::lora_qmatmul")
def _(x, qdata, fmt, n, k, bias, lora_A, lora_B, scale, x_lora, kernel):
    lead = x.shape[:-1]
    return x.new_empty((*lead, n)), x.new_empty((*lead, lora_A.shape[0]))


def _lora_setup_context(ctx, inputs, output):
    x, qdata, fmt, n, k, bias, lora_A, lora_B, scale, x_lora, kernel = inputs
    ctx.fmt, ctx.n, ctx.k, ctx.kernel, ctx.scale = fmt, n, k, kernel, scale
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.separate_lora_input = x_lora is not None
    ctx.n_qdata = len(qdata)
    # The adapter path's input (x, or x after dropout) for grad_A, and its
    # product with A for grad_B: the r-wide xa is kept, not recomputed. The
    # base path needs nothing of x: its gradient is grad_y @ W_hat.
    ctx.save_for_backward(x if x_lora is None else x_lora, lora_A, lora_B, output[1], *qdata)


def _lora_backward(ctx, grad_y, grad_xa):
    x_lora, lora_A, lora_B, xa, *qdata = ctx.saved_tensors
    n, k, s, r = ctx.n, ctx.k, ctx.scale, lora_A.shape[0]
    need_x, need_bias, need_A, need_B, need_x_lora = (ctx.needs_input_grad[i] for i in (0, 5, 6, 7, 9))
    g2 = grad_y.reshape(-1, n)
    # u = dL/dxa: the adapter path's gradient at its narrow point (M x r)
    u = None
    if need_x or need_A or need_x_lora:
        u = (g2 @ lora_B.to(g2.dtype)) * s
        if grad_xa is not None:
            u = u + grad_xa.reshape(-1, r).to(u.dtype)
    grad_x = grad_x_lora = None
    if need_x:
        grad_x = _grad_input(ctx, grad_y, qdata)
        if not ctx.separate_lora_input:
            # the adapter's share of grad_x, added in place: no second M x K tensor
            grad_x.view(-1, k).addmm_(u, lora_A.to(u.dtype))
        grad_x = grad_x.to(ctx.x_dtype)
    if need_x_lora and ctx.separate_lora_input:
        grad_x_lora = (u @ lora_A.to(u.dtype)).reshape(x_lora.shape).to(x_lora.dtype)
    grad_A = (u.t() @ x_lora.reshape(-1, k).to(u.dtype)).to(lora_A.dtype) if need_A else None
    grad_B = ((g2.t() @ xa.reshape(-1, r).to(g2.dtype)) * s).to(lora_B.dtype) if need_B else None
    grad_bias = None
    if ctx.bias_dtype is not None and need_bias:
        grad_bias = g2.sum(0).to(ctx.bias_dtype)
    return grad_x, [None] * ctx.n_qdata, None, None, None, grad_bias, grad_A, grad_B, None, grad_x_lora, None


torch.library.register_autograd("pyquant::lora_qmatmul", _lora_backward, setup_context=_lora_setup_context)


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


@_impl("w8a8_matmul")
def w8a8_matmul_impl(x, qdata, fmt, n, k, bias, kernel):
    return _linear("w8a8_matmul", x, qdata, fmt, n, k, bias, kernel)


torch.library.register_fake("pyquant::w8a8_matmul")(_linear_fake)


# --- solvers: formats are implied by the arguments (fmt None in the registry) ---
@_impl("gptq_block_update")
def gptq_block_update_impl(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out, kernel):
    # M of the query is the block width: the CUDA kernel keeps a block in registers.
    kern = select_kernel("gptq_block_update", None, W.device, W.shape[1], kernel)
    kern.fn(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out)


@torch.library.register_fake("pyquant::gptq_block_update")
def _(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out, kernel):
    return None


def _hqq_outputs(w, group):
    n, k = w.shape
    ng = -(-k // group)
    scales = w.new_empty((n, ng), dtype=torch.float32)
    return (w.new_empty((n, k), dtype=torch.uint8), scales, torch.empty_like(scales), torch.empty_like(scales),
            w.new_empty((n, ng), dtype=torch.int32))


@_impl("hqq_solve")
def hqq_solve_impl(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop, kernel):
    kern = select_kernel("hqq_solve", None, w.device, 1, kernel)
    return kern.fn(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop)


@torch.library.register_fake("pyquant::hqq_solve")
def _(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop, kernel):
    return _hqq_outputs(w, group)


@_impl("hqq_solve_integer_zero")
def hqq_solve_integer_zero_impl(w, bits, group, scale_dtype, zero_slack, iters, lp_norm, beta, kappa, early_stop,
                                kernel):
    kern = select_kernel("hqq_solve_integer_zero", None, w.device, 1, kernel)
    return kern.fn(w, bits, group, scale_dtype, zero_slack, iters, lp_norm, beta, kappa, early_stop)


@torch.library.register_fake("pyquant::hqq_solve_integer_zero")
def _(w, bits, group, scale_dtype, zero_slack, iters, lp_norm, beta, kappa, early_stop, kernel):
    return _hqq_outputs(w, group)


@_impl("kquant_quantize")
def kquant_quantize_impl(x, type, imatrix, kernel):
    fmt = _gguf(type)
    kern = select_kernel("kquant_quantize", fmt, x.device, x.shape[0], kernel)
    return kern.fn(x, fmt, imatrix)


@torch.library.register_fake("pyquant::kquant_quantize")
def _(x, type, imatrix, kernel):
    fmt = _gguf(type)
    n, k = x.shape
    return x.new_empty((n, k // fmt.block.block_size * fmt.block.type_size), dtype=torch.uint8)
