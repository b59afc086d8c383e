"""Lossless conversion between ``hqq`` package layers (``HQQLinear`` state dicts) and pyquant's Int.

An ``HQQLinear`` with ``axis=1`` cuts the row-major flattened weight into
``R = N * K / group_size`` groups of ``group_size`` consecutive values (so a
group never spans two rows when ``group_size`` divides K), and stores, as its
(safetensors-ready, "encoded") state dict:

* ``W_q``: the ``(R, group_size)`` code matrix packed along R: 8 bits as is
  (uint8); 4 bits: row ``r`` of the first half in the high nibble and row
  ``r + R/2`` in the low nibble (uint8 ``(R/2, gs)``); 2 bits: four quarters,
  shifts 6, 4, 2, 0; 3 bits: R padded to a multiple of 10, ten slices in one
  int32, shifts 27, 24, ..., 0. ``view_as_float`` stores the same bytes viewed
  as the compute dtype.
* ``scale``, ``zero``: ``(R, 1)`` floats; ``w = (q - zero) * scale``.
* metadata as small tensors: ``nbits``, ``group_size``, ``axis`` (int32),
  ``shape`` (int64 ``(N, K)``), ``packing`` / ``compute_dtype`` /
  ``unpack_view_dtype`` (strings as uint8 characters), flags as uint8.

That is pyquant's asymmetric Int with float zeros, group by group. HQQ
computes ``(q - zero) * scale`` in its compute dtype; with an fp32 compute
dtype the result is bit-identical to pyquant's decode, in fp16 / bf16 HQQ
rounds the subtraction first and may differ by one unit in the last place.

Not representable (refused with the reason): ``axis=0`` (its groups run down
the columns of the flattened weight, across rows), quantized scales or zeros
(``quant_scale`` / ``quant_zero``), 1/5/6-bit weights, group sizes pyquant has
no layout for, groups that span rows.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from ..errors import FormatError, ShapeError
from ..formats import Int, QuantizedWeight
from ..formats.int_format import SUPPORTED_GROUP_SIZES
from .int_layout import row_layout

_PACKING = {8: "8bit_u8", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8"}
_VIEW_DTYPE = {"8bit_u8": torch.uint8, "4bit_u8": torch.uint8, "3bit_32": torch.int32, "2bit_u8": torch.uint8}
_DTYPES = {"torch.float16": torch.float16, "torch.bfloat16": torch.bfloat16, "torch.float32": torch.float32}
_SLICES = {4: (4, 0), 2: (6, 4, 2, 0), 3: (27, 24, 21, 18, 15, 12, 9, 6, 3, 0), 8: (0,)}
LAYER_MARKER = "W_q"
LAYER_TENSORS = (
    "W_q", "nbits", "group_size", "shape", "scale", "zero", "axis", "packing", "unpack_view_dtype", "view_as_float",
    "quant_scale", "quant_zero", "compute_dtype", "offload_meta", "encoded_state_dict", "stores_quant_config",
    "channel_wise", "optimize", "round_zero",
)


def _text(t: torch.Tensor, name: str) -> str:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or t.numel() > 64:
        raise FormatError(f"HQQ {name} must be a short uint8 string tensor, got {getattr(t, 'dtype', t)}")
    try:
        return bytes(t.tolist()).decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"HQQ {name} is not ASCII text") from None


def _int(t, name: str) -> int:
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.numel() != 1:
        raise FormatError(f"HQQ {name} must be one integer, got {getattr(t, 'dtype', type(t).__name__)}")
    return int(t.reshape(()).item())


def _unpack_rows(w_q: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """``(rows, gs)`` codes from HQQ's row-sliced packing."""
    w = w_q.to(torch.int64)
    if bits != 3:
        w = w & 0xFF
    parts = [(w >> s) & ((1 << bits) - 1) for s in _SLICES[bits]]
    return torch.cat(parts, dim=0)[:rows]


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_unpack_rows`."""
    n_slices = len(_SLICES[bits])
    rows = codes.shape[0]
    padded = -(-rows // n_slices) * n_slices
    c = torch.zeros((padded, codes.shape[1]), dtype=torch.int64)
    c[:rows] = codes
    step = padded // n_slices
    out = torch.zeros((step, codes.shape[1]), dtype=torch.int64)
    for i, s in enumerate(_SLICES[bits]):
        out |= c[i * step : (i + 1) * step] << s
    if bits == 3:
        out = torch.where(out >= 2**31, out - 2**32, out)
        return out.to(torch.int32)
    return out.to(torch.uint8)


def _packed_rows(bits: int, rows: int) -> int:
    n_slices = len(_SLICES[bits])
    return -(-rows // n_slices)


def import_layer(state: Mapping[str, torch.Tensor]) -> QuantizedWeight:
    """An Int QuantizedWeight from one ``HQQLinear``'s encoded state dict (names without the layer prefix)."""
    missing = [k for k in ("W_q", "nbits", "group_size", "shape", "scale", "zero", "axis") if k not in state]
    if missing:
        raise FormatError(f"HQQ layer state has no {missing} entries (has {sorted(state)})")
    for flag in ("quant_scale", "quant_zero"):
        if flag in state and _int(state[flag], flag):
            raise FormatError(f"HQQ {flag}=True (quantized meta-data) has no pyquant equivalent")
    if "channel_wise" in state and not _int(state["channel_wise"], "channel_wise"):
        raise FormatError("HQQ channel_wise=False (one scale for the whole tensor) is not supported")
    bits, group, axis = _int(state["nbits"], "nbits"), _int(state["group_size"], "group_size"), _int(state["axis"], "axis")
    if bits not in _PACKING:
        raise FormatError(f"HQQ nbits={bits} has no pyquant Int layout (2, 3, 4 or 8)")
    if axis != 1:
        raise FormatError(
            f"HQQ axis={axis}: its groups run across rows of the weight, which no pyquant format stores; "
            "quantize with axis=1"
        )
    shape_t = state["shape"]
    if shape_t.dtype.is_floating_point or shape_t.numel() != 2:
        raise FormatError(f"HQQ shape must hold 2 integers, got {shape_t.dtype} {tuple(shape_t.shape)}")
    n, k = (int(v) for v in shape_t.tolist())
    if n < 1 or k < 1 or group < 1 or k % group:
        raise ShapeError(f"HQQ group_size={group} must divide in_features of shape {(n, k)} (groups may not span rows)")
    pyquant_group = -1 if group == k else group
    if pyquant_group not in SUPPORTED_GROUP_SIZES:
        raise FormatError(f"HQQ group_size={group} has no pyquant Int layout (one of {SUPPORTED_GROUP_SIZES} or K)")
    packing = _text(state["packing"], "packing") if "packing" in state else _PACKING[bits]
    if packing != _PACKING[bits]:
        raise FormatError(f"HQQ packing {packing!r} does not match nbits={bits} (expected {_PACKING[bits]!r})")
    rows = n * k // group
    w_q = state["W_q"]
    if w_q.dtype != _VIEW_DTYPE[packing]:
        if "view_as_float" in state and _int(state["view_as_float"], "view_as_float") and w_q.is_floating_point():
            w_q = w_q.contiguous().view(_VIEW_DTYPE[packing])
        else:
            raise FormatError(f"HQQ W_q for packing {packing!r} must be {_VIEW_DTYPE[packing]}, got {w_q.dtype}")
    if tuple(w_q.shape) != (_packed_rows(bits, rows), group):
        raise ShapeError(
            f"HQQ W_q for shape {(n, k)}, group {group}, {bits} bits must be {(_packed_rows(bits, rows), group)}, "
            f"got {tuple(w_q.shape)}"
        )
    scale, zero = state["scale"], state["zero"]
    for name, t in (("scale", scale), ("zero", zero)):
        if t.dtype not in _DTYPES.values() or t.numel() != rows:
            raise FormatError(f"HQQ {name} must hold {rows} float16/bfloat16/float32 values, got {t.dtype} {tuple(t.shape)}")
    if zero.dtype != scale.dtype:
        raise FormatError(f"HQQ zero ({zero.dtype}) and scale ({scale.dtype}) dtypes differ; pyquant stores one")
    codes = _unpack_rows(w_q, bits, rows).reshape(n, k)
    ng = k // group
    fmt = Int(bits, pyquant_group, False, scale.dtype)
    return fmt.pack(codes.to(torch.uint8), scale.reshape(n, ng), zero.reshape(n, ng))


def _u8_text(s: str) -> torch.Tensor:
    return torch.tensor(list(s.encode("ascii")), dtype=torch.uint8)


def export_layer(qw: QuantizedWeight) -> Dict[str, torch.Tensor]:
    """One ``HQQLinear``'s encoded state dict (axis=1) from an Int weight; the compute dtype is the scales'."""
    if not isinstance(qw, QuantizedWeight):
        raise FormatError(f"expected a pyquant QuantizedWeight, got {type(qw).__name__}")
    qw = row_layout(qw)
    fmt = qw.format
    if not isinstance(fmt, Int) or fmt.act_order:
        raise FormatError(
            f"HQQ layers hold Int weights without act-order, got {fmt.spec()} (quantize with act_order=False)"
        )
    n, k = qw.shape
    group = fmt.group_size_for(k)
    if k % group:
        raise ShapeError(f"HQQ groups may not span rows: group_size={group} does not divide in_features={k}")
    rows = n * k // group
    slices = len(_SLICES[fmt.bits])
    if fmt.bits in (2, 4) and rows % slices:
        raise ShapeError(f"HQQ {fmt.bits}-bit packing needs the group count {rows} to be a multiple of {slices}")
    codes, scales, zeros = fmt.unpack(qw)
    dtype_name = {v: k for k, v in _DTYPES.items()}[scales.dtype]
    packing = _PACKING[fmt.bits]
    flag = lambda v: torch.tensor(int(v), dtype=torch.uint8)  # noqa: E731
    i32 = lambda v: torch.tensor(int(v), dtype=torch.int32)  # noqa: E731
    return {
        "W_q": _pack_rows(codes.reshape(rows, group).long(), fmt.bits),
        "nbits": i32(fmt.bits),
        "group_size": i32(group),
        "shape": torch.tensor([n, k], dtype=torch.int64),
        "scale": scales.reshape(rows, 1).contiguous(),
        "zero": zeros.to(scales.dtype).reshape(rows, 1).contiguous(),
        "axis": i32(1),
        "packing": _u8_text(packing),
        "unpack_view_dtype": _u8_text(str(_VIEW_DTYPE[packing])),
        "view_as_float": flag(False),
        "quant_scale": flag(False),
        "quant_zero": flag(False),
        "compute_dtype": _u8_text(dtype_name),
        "offload_meta": flag(False),
        "encoded_state_dict": flag(True),
        "stores_quant_config": flag(True),
        "channel_wise": flag(True),
        "optimize": flag(True),
        "round_zero": flag(False),
    }


def quantization_config(fmt: Int, k: int, skip: list) -> Dict:
    """What transformers' ``HqqConfig`` writes (descriptive: the layer tensors carry every setting)."""
    return {
        "quant_method": "hqq",
        "quant_config": {
            "weight_quant_params": {
                "nbits": fmt.bits,
                "group_size": fmt.group_size_for(k),
                "axis": 1,
                "channel_wise": True,
                "optimize": True,
                "round_zero": False,
                "view_as_float": False,
            },
            "scale_quant_params": None,
            "zero_quant_params": None,
            "offload_meta": False,
        },
        "skip_modules": sorted(skip),
    }
