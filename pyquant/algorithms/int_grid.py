"""Group parameters of the Int format for the calibrated quantizers.

``group_params`` is RTN's rule (``rtn.int_scales_zeros`` calls it) on already
grouped weights, plus an optional per-group *shrink* of the range (clipping): with no
shrink it gives the very scales and zeros RTN gives, which is what lets GPTQ
with an identity Hessian reproduce RTN exactly. ``search_shrink`` picks the
shrink per (row, group) that minimises a (weighted) quantization error.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import ValueRangeError
from ..formats import Int


def group_params(wg: torch.Tensor, fmt: Int, shrink: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) fp32 ``(..., G)`` of fp32 groups ``wg`` ``(..., G, g)``.

    Scales are rounded to ``fmt.scale_dtype`` (as stored); symmetric formats
    get their implicit zero point as a full tensor. ``shrink`` (broadcastable
    to ``(..., G)``, in (0, 1]) multiplies the range ends before the scale is
    taken: 1 reproduces RTN.
    """
    finfo = torch.finfo(fmt.scale_dtype)
    if fmt.symmetric:
        absmax = wg.abs().amax(-1)
        if shrink is not None:
            absmax = absmax * shrink
        scale = absmax / ((1 << (fmt.bits - 1)) - 1)
        lo = None
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        if shrink is not None:
            lo = lo * shrink
            hi = hi * shrink
        scale = (hi - lo) / fmt.max_code
    if bool((scale > finfo.max).any()):
        raise ValueRangeError(
            f"weight range {float(scale.max()):.4g} per code overflows scale dtype {fmt.scale_dtype}; "
            "use scale_dtype=torch.float32"
        )
    # Quantize with the scale as it will be stored, so codes and scales agree.
    scale = scale.to(fmt.scale_dtype).to(torch.float32)
    # An all-zero group (or one whose scale underflowed) gets a harmless scale.
    scale = torch.where(scale > 0, scale, torch.full_like(scale, finfo.tiny if finfo.bits > 16 else 2.0**-14))
    if fmt.symmetric:
        zero = torch.full_like(scale, float(fmt.zero_point))
    else:
        zero = torch.round(-lo / scale).clamp(0, fmt.max_code)
    return scale, zero


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
    finfo = torch.finfo(fmt.scale_dtype)
    tiny = finfo.tiny if finfo.bits > 16 else 2.0**-14
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
            scale = absmax * p / ((1 << (fmt.bits - 1)) - 1)
        else:
            lo_p = lo * p
            scale = (hi * p - lo_p) / fmt.max_code
        scale = scale.to(fmt.scale_dtype).to(torch.float32)
        scale = torch.where(scale > 0, scale, torch.full_like(scale, tiny))
        if fmt.symmetric:
            zero = torch.full_like(scale, float(fmt.zero_point))
        else:
            zero = torch.round(-lo_p / scale).clamp(0, fmt.max_code)
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
