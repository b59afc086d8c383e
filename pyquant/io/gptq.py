"""Lossless conversion between GPTQ checkpoints and pyquant's Int format.

GPTQ layout (AutoGPTQ / GPTQModel, ``bits`` in 2, 3, 4, 8):
* ``qweight`` int32 ``(K * bits / 32, N)``: codes packed along K (input features);
* ``qzeros``  int32 ``(num_groups, N * bits / 32)``: zero points packed along N;
* ``scales``  fp16 ``(num_groups, N)``;
* ``g_idx``   int32 ``(K,)``: the group of each input column. Trivial
  (``k // group_size``) unless the model was quantized with act-order.
``w = (q - z) * s``. Version 1 checkpoints store ``z - 1`` in qzeros (the
historical AutoGPTQ off-by-one); version 2 (GPTQModel's ``checkpoint_format
gptq_v2``) stores ``z``.

Act-order checkpoints become an ``Int(..., act_order=True)`` weight: sorting
the columns by group makes every group contiguous, and ``perm`` records where
each stored column came from.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..errors import DtypeError, FormatError, ShapeError
from ..formats import Int, QuantizedWeight
from .int32_bitstream import pack_int32, unpack_int32


def _check_version(version: int) -> None:
    if version not in (1, 2):
        raise FormatError(f"GPTQ checkpoint version must be 1 or 2, got {version!r}")


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    version: int = 1,
    symmetric: Optional[bool] = None,
) -> QuantizedWeight:
    """GPTQ tensors -> QuantizedWeight. ``symmetric=None`` detects it from the zeros."""
    _check_version(version)
    if bits not in (2, 3, 4, 8):
        raise FormatError(f"GPTQ bits must be 2, 3, 4 or 8, got {bits!r}")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise DtypeError(f"GPTQ {name} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if scales.dim() != 2 or not scales.is_floating_point():
        raise DtypeError(f"GPTQ scales must be a 2-D float tensor, got {scales.dtype} {tuple(scales.shape)}")
    ng, n = scales.shape
    k = qweight.shape[0] * 32 // bits
    if qweight.shape[1] != n:
        raise ShapeError(f"GPTQ qweight has {qweight.shape[1]} columns but scales has {n}")
    if qzeros.shape != (ng, n * bits // 32):
        raise ShapeError(f"GPTQ qzeros must have shape {(ng, n * bits // 32)}, got {tuple(qzeros.shape)}")
    gs = k if group_size == -1 else group_size
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device) // gs
    if g_idx.shape != (k,):
        raise ShapeError(f"GPTQ g_idx must have shape ({k},), got {tuple(g_idx.shape)}")
    g_idx = g_idx.long()
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= ng:
        raise FormatError(f"GPTQ g_idx values must lie in [0, {ng - 1}], got [{int(g_idx.min())}, {int(g_idx.max())}]")

    codes = unpack_int32(qweight, bits, 0, k).T  # (N, K)
    zeros = unpack_int32(qzeros, bits, 1, n).T.to(torch.float32).contiguous()  # (N, ng)
    if version == 1:
        zeros = zeros + 1
    trivial = torch.equal(g_idx, torch.arange(k, device=g_idx.device) // gs)
    perm = None
    if not trivial:
        perm = torch.sort(g_idx, stable=True).indices
        if not torch.equal(g_idx[perm], torch.arange(k, device=g_idx.device) // gs):
            raise FormatError(
                f"GPTQ g_idx groups do not have {gs} columns each (group sizes "
                f"{torch.bincount(g_idx, minlength=ng).tolist()[:8]}...); this layout has no Int equivalent"
            )
        codes = codes[:, perm]
    mid = float(1 << (bits - 1))
    if symmetric is None:
        symmetric = bool((zeros == mid).all())
    fmt = Int(bits, group_size, symmetric, torch.float16 if scales.dtype == torch.float16 else scales.dtype, perm is not None)
    if fmt.num_groups(k) != ng:
        raise ShapeError(f"K={k} with group_size={group_size} gives {fmt.num_groups(k)} groups, scales has {ng}")
    return fmt.pack(
        codes.to(torch.uint8),
        scales.T.contiguous(),
        None if symmetric else zeros,
        perm=None if perm is None else perm.to(torch.int32),
    )


def to_gptq(qw: QuantizedWeight, version: int = 1) -> Dict[str, torch.Tensor]:
    """QuantizedWeight (Int, integral zeros, K a multiple of 32/bits) -> GPTQ tensors."""
    _check_version(version)
    fmt = qw.format
    if not isinstance(fmt, Int):
        raise FormatError(f"to_gptq needs an Int format, got {fmt.spec()}")
    n, k = qw.shape
    if (k * fmt.bits) % 32:
        raise ShapeError(f"GPTQ packs K along int32 words: in_features={k} at {fmt.bits} bits does not fill them")
    if (n * fmt.bits) % 32:
        raise ShapeError(f"GPTQ packs zeros along N: out_features={n} at {fmt.bits} bits does not fill int32 words")
    codes, scales, zeros = fmt.unpack(qw)
    zf = zeros.to(torch.float32)
    if not torch.equal(zf, zf.round()) or int(zf.min()) < 0 or int(zf.max()) > fmt.max_code:
        raise FormatError(
            "GPTQ stores integer zero points in [0, 2**bits); this weight has float zeros (HQQ, or GPTQ with "
            "gptq_refit='scale_zero'): quantize with gptq_refit='scale' or None to export it"
        )
    z = zf.long()
    if version == 1:
        if int(z.min()) < 1:
            raise FormatError("GPTQ v1 stores zero-1 and cannot hold a zero point of 0; export with version=2")
        z = z - 1
    gs = fmt.group_size_for(k)
    g_idx = torch.arange(k, device=codes.device) // gs
    if fmt.act_order:
        perm = qw.tensors["perm"].long()
        orig = torch.empty_like(codes)
        orig[:, perm] = codes
        codes = orig
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = torch.arange(k, device=codes.device) // gs
    return {
        "qweight": pack_int32(codes.T.long(), fmt.bits, 0),
        "qzeros": pack_int32(z.T, fmt.bits, 1),
        "scales": scales.T.contiguous().to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }
