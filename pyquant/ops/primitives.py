"""Group parameter math every Int quantizer shares (torchao's quant_primitives idea).

One round-to-nearest rule for a group's scale and zero point, used by RTN,
GPTQ's quantizer, AWQ's search and clipping, and HQQ's initialisation:

* asymmetric: the range ``[min(w, 0), max(w, 0)]`` (0 is exactly representable,
  so zero-padding a ragged last group changes nothing), ``scale = range /
  max_code`` rounded to the stored dtype, ``zero = round(-lo / scale)`` clamped
  to the code range (an integer);
* symmetric: ``scale = absmax / (2**(bits-1) - 1)`` rounded to the stored dtype,
  zero the format's implicit ``2**(bits-1)``;
* a group whose scale is 0 (all zeros, or an underflow) gets :func:`tiny_scale`
  so that every division by it is defined and its codes decode to 0.

Divisions are tensor / tensor: IEEE division rounds once, where torch turns a
division by a Python scalar into a multiply by its reciprocal on some devices
(two roundings), and the kernels divide once.

``group_params`` applies the rule to grouped weights, with an optional
per-group *shrink* of the range (clipping): with no shrink it gives RTN's
parameters exactly, which is what lets GPTQ with an identity Hessian
reproduce RTN. ``search_shrink`` picks the shrink per (row, group) that
minimises a (weighted) quantization error.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import ValueRangeError
from ..formats import Int


def tiny_scale(scale_dtype: torch.dtype) -> float:
    """The scale of a group whose range is 0: the smallest normal of the stored
    dtype (fp16's 2**-14 also for bf16, whose tiny normal would overflow 1/s)."""
    finfo = torch.finfo(scale_dtype)
    return finfo.tiny if finfo.bits > 16 else 2.0**-14


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> ``dtype`` -> fp32 (round to nearest even; overflow gives inf)."""
    return x.to(dtype).to(torch.float32)


def _div(a: torch.Tensor, b) -> torch.Tensor:
    return torch.div(a, b if isinstance(b, torch.Tensor) else torch.full_like(a, b))


def _stored_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    scale = round_to(scale, scale_dtype)
    return torch.where(scale > 0, scale, torch.full_like(scale, tiny_scale(scale_dtype)))


def range_scale_zero(lo: torch.Tensor, hi: torch.Tensor, max_code: int, scale_dtype: torch.dtype):
    """Asymmetric RTN parameters fp32 ``(scale, zero)`` of groups with min ``lo``
    and max ``hi`` (any shape): the range widened to include 0, the scale as
    stored, an integral zero in ``[0, max_code]``."""
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = _stored_scale(_div(hi - lo, float(max_code)), scale_dtype)
    return scale, torch.round(_div(-lo, scale)).clamp(0, max_code)


def absmax_scale(absmax: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """Symmetric RTN scale fp32 as stored: ``absmax / (2**(bits-1) - 1)``, so
    both +absmax and -absmax are representable."""
    return _stored_scale(_div(absmax, float((1 << (bits - 1)) - 1)), scale_dtype)


def _check_overflow(unrounded: torch.Tensor, scale_dtype: torch.dtype) -> None:
    if bool((unrounded > torch.finfo(scale_dtype).max).any()):
        raise ValueRangeError(
            f"weight range {float(unrounded.max()):.4g} per code overflows scale dtype {scale_dtype}; "
            "use scale_dtype=torch.float32"
        )


def group_params(wg: torch.Tensor, fmt: Int, shrink: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) fp32 ``(..., G)`` of fp32 groups ``wg`` ``(..., G, g)``.

    Scales are rounded to ``fmt.scale_dtype`` (as stored); symmetric formats
    get their implicit zero point as a full tensor. ``shrink`` (broadcastable
    to ``(..., G)``, in (0, 1]) multiplies the range ends before the scale is
    taken: 1 reproduces RTN. Raises ValueRangeError when a scale overflows its
    dtype.
    """
    if fmt.symmetric:
        absmax = wg.abs().amax(-1)
        if shrink is not None:
            absmax = absmax * shrink
        _check_overflow(absmax / ((1 << (fmt.bits - 1)) - 1), fmt.scale_dtype)
        scale = absmax_scale(absmax, fmt.bits, fmt.scale_dtype)
        return scale, torch.full_like(scale, float(fmt.zero_point))
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    if shrink is not None:
        lo = lo * shrink
        hi = hi * shrink
    _check_overflow((hi - lo) / fmt.max_code, fmt.scale_dtype)
    return range_scale_zero(lo, hi, fmt.max_code, fmt.scale_dtype)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: int):
    """Codes (float) and dequantized values of ``w`` with per-element-broadcast params."""
    q = (torch.round(w / scale) + zero).clamp(0, max_code)
    return q, (q - zero) * scale


def pad_groups(w: torch.Tensor, g: int) -> torch.Tensor:
    """``(N, K)`` -> ``(N, ceil(K/g), g)``, zero padded (0 lies in every range)."""
    n, k = w.shape
    ng = -(-k // g)
    if ng * g == k:
        return w.reshape(n, ng, g)
    wp = torch.zeros((n, ng * g), dtype=w.dtype, device=w.device)
    wp[:, :k] = w
    return wp.view(n, ng, g)


def group_error(wg: torch.Tensor, dq: torch.Tensor, weight: Optional[torch.Tensor], norm: float) -> torch.Tensor:
    """Error per group ``(N, G)``; ``weight`` None (plain), ``(G, g)`` (per-column
    weights, e.g. diag(H)) or ``(G, g, g)`` (a block of the Gram matrix:
    the group's share of the output error, ``d^T H_gg d``)."""
    d = dq - wg
    if weight is None:
        return d.abs().pow(norm).sum(-1) if norm != 2 else (d * d).sum(-1)
    if weight.dim() == 2:
        return (d * d * weight).sum(-1)
    dt = d.transpose(0, 1)  # (G, N, g): one batched GEMM over the groups
    return (torch.bmm(dt, weight) * dt).sum(-1).transpose(0, 1)


def search_shrink(
    wg: torch.Tensor,
    fmt: Int,
    grid: int = 20,
    max_shrink: float = 0.2,
    weight: Optional[torch.Tensor] = None,
    norm: float = 2.0,
) -> torch.Tensor:
    """Per-(row, group) shrink in ``{1 - j * max_shrink / grid}`` minimising
    :func:`group_error`; ties keep the larger range (1.0 first), so the result
    is never worse than RTN on the chosen error.

    The candidates' parameters follow :func:`group_params` step by step (same
    roundings), with the group's range reduced once instead of per candidate.
    """
    if fmt.symmetric:
        absmax = wg.abs().amax(-1)
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
    best_err = None
    best = torch.ones(wg.shape[:-1], dtype=torch.float32, device=wg.device)
    for j in range(grid):
        p = 1.0 - j * max_shrink / grid
        if fmt.symmetric:
            scale = absmax_scale(absmax * p, fmt.bits, fmt.scale_dtype)
            zero = torch.full_like(scale, float(fmt.zero_point))
        else:
            scale, zero = range_scale_zero(lo * p, hi * p, fmt.max_code, fmt.scale_dtype)
        s3, z3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
        q = torch.div(wg, s3).round_().add_(z3).clamp_(0, fmt.max_code)
        dq = q.sub_(z3).mul_(s3)
        err = group_error(wg, dq, weight, norm)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, p), best)
    return best
