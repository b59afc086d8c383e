"""What the integer checkpoint layouts (GPTQ, AWQ, compressed-tensors) share.

All three store ``w = (q - z) * s`` with integer codes and integer zero points,
columns in their original order, and (GPTQ, compressed-tensors) act-order as a
``g_idx`` that names the group of every column. pyquant's Int stores act-order
weights with columns sorted by group plus the permutation ``perm``; these
helpers go between the two, and refuse what an integer layout cannot hold.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import DtypeError, FormatError, ShapeError
from ..formats import Int, IntMMA, QuantizedWeight, from_mma


def row_layout(qw: QuantizedWeight) -> QuantizedWeight:
    """``qw`` with Int's row layout: a weight repacked for the tensor-core kernel (IntMMA)
    goes back losslessly, since every exchange layout is defined on rows of codes."""
    return from_mma(qw) if isinstance(qw.format, IntMMA) else qw


def perm_from_g_idx(g_idx: torch.Tensor, k: int, group_size: int, num_groups: int, what: str) -> Optional[torch.Tensor]:
    """The permutation that sorts columns by group (None when ``g_idx`` is sequential).

    Refuses a ``g_idx`` whose groups do not hold ``group_size`` columns each
    (the last one may be shorter): such a layout has no Int equivalent.
    """
    if g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool or g_idx.dim() != 1:
        raise DtypeError(f"{what} g_idx must be a 1-D integer tensor, got {g_idx.dtype} {tuple(g_idx.shape)}")
    if g_idx.shape != (k,):
        raise ShapeError(f"{what} g_idx must have shape ({k},), got {tuple(g_idx.shape)}")
    g_idx = g_idx.long()
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
        raise FormatError(
            f"{what} g_idx values must lie in [0, {num_groups - 1}], got [{int(g_idx.min())}, {int(g_idx.max())}]"
        )
    sequential = torch.arange(k, device=g_idx.device) // group_size
    if torch.equal(g_idx, sequential):
        return None
    perm = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[perm], sequential):
        raise FormatError(
            f"{what} g_idx groups do not have {group_size} columns each (group sizes "
            f"{torch.bincount(g_idx, minlength=num_groups).tolist()[:8]}...); this layout has no Int equivalent"
        )
    return perm


def original_columns(qw: QuantizedWeight, codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(codes, g_idx)`` with columns back in the logical order of an Int weight."""
    fmt = qw.format
    k = qw.shape[1]
    gs = fmt.group_size_for(k)
    groups = torch.arange(k, device=codes.device) // gs
    if not fmt.act_order:
        return codes, groups.to(torch.int32)
    perm = qw.tensors["perm"].long()
    orig = torch.empty_like(codes)
    orig[:, perm] = codes
    g_idx = torch.empty_like(groups)
    g_idx[perm] = groups
    return orig, g_idx.to(torch.int32)


def integer_zeros(fmt: Int, zeros: torch.Tensor, what: str) -> torch.Tensor:
    """Zero points as int64, refusing the float zeros (HQQ, GPTQ's default refit) integer layouts cannot hold."""
    zf = zeros.to(torch.float32)
    if not torch.equal(zf, zf.round()) or int(zf.min()) < 0 or int(zf.max()) > fmt.max_code:
        raise FormatError(
            f"{what} stores integer zero points in [0, {fmt.max_code}]; this weight has float zeros (GPTQ with "
            "gptq_refit='scale_zero', the default, or HQQ): quantize with QuantConfig(gptq_refit='scale') (or None), "
            "or for HQQ hqq_zero_point='integer', to export it"
        )
    return zf.long()


def exact_scales(scales: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``scales`` in ``dtype``, refusing any value that dtype cannot hold exactly."""
    cast = scales.to(dtype)
    if not torch.equal(cast.to(scales.dtype), scales):
        raise FormatError(
            f"{what} stores {dtype} scales; this weight has {scales.dtype} scales that {dtype} cannot hold exactly: "
            f"quantize with scale_dtype={dtype} to export it"
        )
    return cast.contiguous()
