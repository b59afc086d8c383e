"""Lossless conversion between AutoAWQ "GEMM" checkpoints and pyquant's Int format.

AWQ layout (4-bit only):
* ``qweight`` int32 ``(K, N / 8)``: codes packed along N (output features),
  eight per word in the nibble order 0, 2, 4, 6, 1, 3, 5, 7 (chosen by AWQ for
  its CUDA dequantization trick);
* ``qzeros`` int32 ``(num_groups, N / 8)``: integer zero points, same packing;
* ``scales`` fp16 ``(num_groups, N)``.
``w = (q - z) * s``; no act-order.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..errors import DtypeError, FormatError, ShapeError
from ..formats import Int, QuantizedWeight
from .int32_bitstream import pack_int32, unpack_int32

# Nibble i of a packed word holds output column 8c + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_INVERSE = tuple(AWQ_ORDER.index(i) for i in range(8))


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    rows, n = values.shape
    v = values.view(rows, n // 8, 8)[..., list(AWQ_ORDER)].reshape(rows, n)
    return pack_int32(v, 4, 1)


def _unpack_awq(words: torch.Tensor, n: int) -> torch.Tensor:
    v = unpack_int32(words, 4, 1, n)
    return v.view(v.shape[0], n // 8, 8)[..., list(_INVERSE)].reshape(v.shape[0], n)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> QuantizedWeight:
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise DtypeError(f"AWQ {name} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if scales.dim() != 2 or not scales.is_floating_point():
        raise DtypeError(f"AWQ scales must be a 2-D float tensor, got {scales.dtype} {tuple(scales.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    ng = scales.shape[0]
    if scales.shape[1] != n or qzeros.shape != (ng, n // 8):
        raise ShapeError(
            f"AWQ shapes disagree: qweight {tuple(qweight.shape)} implies N={n}; scales {tuple(scales.shape)}, "
            f"qzeros {tuple(qzeros.shape)}"
        )
    fmt = Int(4, group_size, False, scales.dtype)
    if fmt.num_groups(k) != ng:
        raise ShapeError(f"K={k} with group_size={group_size} gives {fmt.num_groups(k)} groups, scales has {ng}")
    codes = _unpack_awq(qweight, n).T.to(torch.uint8)
    zeros = _unpack_awq(qzeros, n).T.to(torch.float32).contiguous()
    return fmt.pack(codes, scales.T.contiguous(), zeros)


def to_awq(qw: QuantizedWeight) -> Dict[str, torch.Tensor]:
    fmt = qw.format
    if not isinstance(fmt, Int) or fmt.bits != 4 or fmt.act_order:
        raise FormatError(f"AWQ checkpoints hold 4-bit Int weights without act-order, got {fmt.spec()}")
    n, k = qw.shape
    if n % 8:
        raise ShapeError(f"AWQ packs 8 output features per int32: out_features={n} is not a multiple of 8")
    codes, scales, zeros = fmt.unpack(qw)
    zf = zeros.to(torch.float32)
    if not torch.equal(zf, zf.round()) or int(zf.min()) < 0 or int(zf.max()) > 15:
        raise FormatError(
            "AWQ stores integer zero points in [0, 15]; this weight has float zeros (HQQ, or GPTQ with "
            "gptq_refit='scale_zero')"
        )
    return {
        "qweight": _pack_awq(codes.T.long()),
        "qzeros": _pack_awq(zf.long().T),
        "scales": scales.T.contiguous().to(torch.float16),
    }
