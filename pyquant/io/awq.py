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
from .int_layout import exact_scales, integer_zeros, row_layout

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
    z = integer_zeros(fmt, zeros, "AWQ")
    return {
        "qweight": _pack_awq(codes.T.long()),
        "qzeros": _pack_awq(z.T),
        "scales": scales.T.contiguous().to(torch.float16),
    }


# --- one layer of a checkpoint, and the checkpoint's quantization_config ------------------
LAYER_TENSORS = ("qweight", "qzeros", "scales")


def export_layer(qw: QuantizedWeight) -> Dict[str, torch.Tensor]:
    """One layer's AWQ GEMM tensors (``qweight``, ``qzeros``, ``scales``) from a 4-bit Int weight."""
    if not isinstance(qw, QuantizedWeight):
        raise FormatError(f"expected a pyquant QuantizedWeight, got {type(qw).__name__}")
    qw = row_layout(qw)
    if isinstance(qw.format, Int) and qw.format.group_size == -1:
        raise FormatError("AWQ checkpoints hold grouped weights; this one is per-channel (group_size=-1)")
    out = to_awq(qw)
    out["scales"] = exact_scales(qw.tensors["scales"], torch.float16, "AWQ").T.contiguous()
    return out


def import_layer(tensors: Dict[str, torch.Tensor], bits: int, group_size: int) -> QuantizedWeight:
    """An Int QuantizedWeight from one layer's AWQ GEMM tensors."""
    if bits != 4:
        raise FormatError(f"AWQ GEMM checkpoints are 4-bit, got bits={bits!r}")
    missing = [name for name in LAYER_TENSORS if name not in tensors]
    if missing:
        raise FormatError(f"AWQ layer has no {missing} tensor (has {sorted(tensors)})")
    return from_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size)


def quantization_config(fmt: Int) -> Dict:
    """The ``quantization_config`` transformers and AutoAWQ read (GEMM kernels, zero points)."""
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": fmt.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def parse_quantization_config(q: Dict, where: str):
    """``(bits, group_size)`` from an AWQ ``quantization_config`` (AutoAWQ's or transformers' names)."""
    bits = q.get("bits", q.get("w_bit"))
    group = q.get("group_size", q.get("q_group_size"))
    version = str(q.get("version", "gemm")).lower()
    if bits != 4 or isinstance(bits, bool):
        raise FormatError(f"{where}: AWQ bits must be 4, got {bits!r}")
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
        raise FormatError(f"{where}: AWQ group_size must be a positive integer, got {group!r}")
    if version != "gemm":
        raise FormatError(f"{where}: AWQ version {version!r} is not supported (only the GEMM layout)")
    if q.get("zero_point", True) is not True:
        raise FormatError(f"{where}: AWQ without zero points is not supported")
    return bits, group
