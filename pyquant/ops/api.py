"""Public entry points of the weight ops: validate at the boundary, then call the op.

``dequantize``, ``qmatmul``, ``pack``, ``unpack`` and ``w8a8_matmul`` check
every argument a user can get wrong (types, dtypes, devices, shapes) and raise
a pyquant error naming it; the op's kernels then trust their inputs.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import FormatError, ShapeError
from ..formats import Format, QuantizedWeight
from ..validation import check_dtype_arg, check_matmul_inputs, check_same_device, check_tensor
from . import library, plans
from .reference.w8a8 import is_w8a8_format
from .solvers import check_kernel_arg as _check_kernel


def _check_qw(qw) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise FormatError(f"expected a pyquant QuantizedWeight, got {type(qw).__name__}")


def _check_code_format(fmt) -> None:
    if fmt.family not in ("int", "nf4"):
        raise FormatError(f"pack/unpack are defined for the code formats (Int, NF4), not {fmt.spec()}")




def dequantize(
    qw: QuantizedWeight, dtype: torch.dtype = torch.float32, kernel: str = "auto", out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The float weight ``(out_features, in_features)`` that ``qw`` encodes.

    ``out``: a contiguous ``(N, K)`` tensor of ``dtype`` on the weight's device to
    write into (and return); reusing one buffer avoids the cost of fresh pages.
    """
    _check_qw(qw)
    check_dtype_arg("dtype", dtype)
    _check_kernel(kernel)
    n, k = qw.shape
    if out is not None:
        check_tensor("out", out)
        if tuple(out.shape) != (n, k) or out.dtype != dtype or not out.is_contiguous():
            raise ShapeError(
                f"out must be a contiguous ({n}, {k}) tensor of {dtype}, got {tuple(out.shape)} {out.dtype}"
                f"{'' if out.is_contiguous() else ' (not contiguous)'}"
            )
        check_same_device("out", out, qw.device, "the quantized weight")
        torch.ops.pyquant.dequantize_out(qw.tensor_list(), qw.format.spec(), n, k, kernel, out)
        return out
    return torch.ops.pyquant.dequantize(qw.tensor_list(), qw.format.spec(), n, k, dtype, kernel)


def _op_layer_is_idle(tensors) -> bool:
    """True when going through ``torch.ops.pyquant.qmatmul`` would only cost
    time: plain eager tensors (parameters included), nothing for autograd to
    record, and no compiler, tracer, functorch transform or Python mode that must
    see the op as one node. The dispatcher and autograd wrapper cost ~20-30 us
    per call, as much as the whole GEMV of a 2048-wide decode layer."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager_call(x: torch.Tensor, bias: Optional[torch.Tensor], qdata, n: int) -> bool:
    """``_op_layer_is_idle`` and the bias's checks for the steady-state call, whose
    x (a plain tensor, last dim K) and packed tensors (the identical ones its
    plan was built from: ``PlanCache.planned``) need no more: one frame instead
    of five. False sends the call down the full path, which names any error."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    grad = torch.is_grad_enabled()
    if grad and (x.requires_grad or any(q.requires_grad for q in qdata)):
        return False
    return bias is None or (
        type(bias) in _PLAIN and not (grad and bias.requires_grad) and bias.is_floating_point()
        and bias.dim() == 1 and bias.shape[0] == n and bias.device == x.device
    )


def linear(x: torch.Tensor, qdata, fmt: Format, shape, bias: Optional[torch.Tensor], kernel: str,
           cache: plans.PlanCache) -> torch.Tensor:
    """``x @ W_hat.T + bias`` for the packed tensors ``qdata`` of a weight: what
    ``qmatmul`` and ``QuantLinear.forward`` run after their own checks.

    In plain eager inference the launch plan of ``cache`` runs (same kernel
    selection, same result, the host work done once per weight and M bucket);
    anything that needs the op as a graph node or an autograd node (compile,
    tracing, modes, gradients) goes through ``torch.ops.pyquant.qmatmul``."""
    n, k = shape
    if type(x) is torch.Tensor and x.dim() and x.shape[-1] == k and _plain_eager_call(x, bias, qdata, n):
        plan = cache.planned(x, qdata, kernel)
        if plan is not None:
            return plans.launch(plan, x, bias, shape)
    check_matmul_inputs(x, n, k, qdata[0].device, bias)
    if _op_layer_is_idle((x, bias, *qdata)):
        return plans.run_qmatmul(cache, x, qdata, fmt, shape, bias, kernel)
    return torch.ops.pyquant.qmatmul(x, qdata, fmt.spec(), n, k, bias, kernel)


def plan_cache(qw: QuantizedWeight) -> plans.PlanCache:
    """The launch plans of ``qw``, kept on the object (a copy starts empty)."""
    cache = qw.__dict__.get("_launch_plans")
    if cache is None:
        cache = qw.__dict__["_launch_plans"] = plans.PlanCache()
    return cache


def qmatmul(
    x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, kernel: str = "auto"
) -> torch.Tensor:
    """``x @ W_hat.T + bias`` for any leading batch dims; output in ``x.dtype``.

    In plain eager inference a launch plan cached on ``qw`` runs (same kernel
    selection, same result); anything that needs the op as a graph node or an
    autograd node (compile, tracing, modes, gradients) goes through
    ``torch.ops.pyquant.qmatmul``.
    """
    _check_qw(qw)
    _check_kernel(kernel)
    cache = plan_cache(qw)
    tensors = qw.tensors
    return linear(x, [tensors[n] for n in cache.names(qw.format, qw.shape)], qw.format, qw.shape, bias, kernel, cache)


def pack(codes: torch.Tensor, fmt: Format, kernel: str = "auto") -> torch.Tensor:
    """Pack integer codes ``(N, K)`` into ``fmt``'s ``qweight`` layout."""
    check_tensor("codes", codes)
    if not isinstance(fmt, Format):
        raise FormatError(f"fmt must be a pyquant Format, got {type(fmt).__name__}")
    _check_code_format(fmt)
    if codes.dim() != 2 or codes.numel() == 0:
        raise ShapeError(f"codes must be a non-empty 2-D tensor, got shape {tuple(codes.shape)}")
    fmt.check_shape(tuple(codes.shape))
    return torch.ops.pyquant.pack(codes, fmt.spec(), kernel)


def unpack(qw: QuantizedWeight, kernel: str = "auto") -> torch.Tensor:
    """The uint8 codes ``(N, K)`` stored in ``qw`` (Int and NF4 formats)."""
    _check_qw(qw)
    _check_code_format(qw.format)
    n, k = qw.shape
    return torch.ops.pyquant.unpack(qw.tensors["qweight"], qw.format.spec(), n, k, kernel)


def w8a8_matmul(
    x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None, kernel: str = "auto"
) -> torch.Tensor:
    """``x @ W_hat.T + bias`` with ``x`` quantized to int8 per token; output in ``x.dtype``.

    ``qw`` must be an ``Int(8, -1, symmetric=True)`` weight. Any leading batch
    dims of ``x`` are kept. Not differentiable (an inference op).
    """
    if not isinstance(qw, QuantizedWeight):
        raise FormatError(f"expected a pyquant QuantizedWeight, got {type(qw).__name__}")
    if not is_w8a8_format(qw.format):
        raise FormatError(
            f"w8a8_matmul needs an Int(8, group_size=-1, symmetric=True) weight without act_order, "
            f"got {qw.format.spec()}"
        )
    _check_kernel(kernel)
    n, k = qw.shape
    check_matmul_inputs(x, n, k, qw.device, bias)
    return torch.ops.pyquant.w8a8_matmul(x, qw.tensor_list(), qw.format.spec(), n, k, bias, kernel)
