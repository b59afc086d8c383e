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
from .int_layout import exact_scales, integer_zeros, original_columns, perm_from_g_idx, row_layout


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
    Int(bits, group_size)  # refuses a group size pyquant has no layout for, before it divides anything
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise DtypeError(f"GPTQ {name} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if scales.dim() != 2 or not scales.is_floating_point():
        raise DtypeError(f"GPTQ scales must be a 2-D float tensor, got {scales.dtype} {tuple(scales.shape)}")
    ng, n = scales.shape
    if ng < 1 or n < 1 or qweight.shape[0] < 1:
        raise ShapeError(f"GPTQ tensors are empty: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)}")
    if (qweight.shape[0] * 32) % bits:
        raise ShapeError(f"GPTQ qweight has {qweight.shape[0]} rows of int32, not a whole number of {bits}-bit codes")
    k = qweight.shape[0] * 32 // bits
    if qweight.shape[1] != n:
        raise ShapeError(f"GPTQ qweight has {qweight.shape[1]} columns but scales has {n}")
    if qzeros.shape != (ng, n * bits // 32):
        raise ShapeError(f"GPTQ qzeros must have shape {(ng, n * bits // 32)}, got {tuple(qzeros.shape)}")
    gs = k if group_size == -1 else group_size
    perm = None if g_idx is None else perm_from_g_idx(g_idx, k, gs, ng, "GPTQ")

    codes = unpack_int32(qweight, bits, 0, k).T  # (N, K)
    zeros = unpack_int32(qzeros, bits, 1, n).T.to(torch.float32).contiguous()  # (N, ng)
    if version == 1:
        zeros = zeros + 1
    if perm is not None:
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
    z = integer_zeros(fmt, zeros, "GPTQ")
    if version == 1:
        if int(z.min()) < 1:
            raise FormatError(
                "GPTQ v1 stores zero-1 and cannot hold a zero point of 0; export with version=2 "
                "(checkpoint_format='gptq_v2')"
            )
        z = z - 1
    codes, g_idx = original_columns(qw, codes)
    return {
        "qweight": pack_int32(codes.T.long(), fmt.bits, 0),
        "qzeros": pack_int32(z.T, fmt.bits, 1),
        "scales": scales.T.contiguous().to(torch.float16),
        "g_idx": g_idx,
    }


# --- one layer of a checkpoint, and the checkpoint's quantization_config ------------------
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 2}
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def _version(checkpoint_format: str) -> int:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise FormatError(
            f"GPTQ checkpoint_format must be one of {sorted(CHECKPOINT_FORMATS)}, got {checkpoint_format!r}"
        )
    return CHECKPOINT_FORMATS[checkpoint_format]


def export_layer(qw: QuantizedWeight, checkpoint_format: str = "gptq") -> Dict[str, torch.Tensor]:
    """One layer's GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) from an Int weight.

    ``checkpoint_format="gptq"`` (AutoGPTQ, v1 zeros stored minus one) or ``"gptq_v2"`` (GPTQModel).
    """
    version = _version(checkpoint_format)
    if not isinstance(qw, QuantizedWeight):
        raise FormatError(f"expected a pyquant QuantizedWeight, got {type(qw).__name__}")
    qw = row_layout(qw)
    out = to_gptq(qw, version=version)
    out["scales"] = exact_scales(qw.tensors["scales"], torch.float16, "GPTQ").T.contiguous()
    return out


def import_layer(
    tensors: Dict[str, torch.Tensor], bits: int, group_size: int, checkpoint_format: str = "gptq"
) -> QuantizedWeight:
    """An Int QuantizedWeight from one layer's GPTQ tensors (``g_idx`` optional)."""
    version = _version(checkpoint_format)
    missing = [name for name in LAYER_TENSORS[:3] if name not in tensors]
    if missing:
        raise FormatError(f"GPTQ layer has no {missing} tensor (has {sorted(tensors)})")
    return from_gptq(
        tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"), bits, group_size, version
    )


def quantization_config(fmt: Int, act_order: bool, checkpoint_format: str = "gptq") -> Dict:
    """The ``quantization_config`` transformers, GPTQModel and AutoGPTQ read."""
    _version(checkpoint_format)
    return {
        "quant_method": "gptq",
        "bits": fmt.bits,
        "group_size": fmt.group_size,
        "desc_act": bool(act_order),
        "sym": fmt.symmetric,
        "checkpoint_format": checkpoint_format,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": False,
    }


def parse_quantization_config(q: Dict, where: str):
    """``(bits, group_size, checkpoint_format)`` from a GPTQ ``quantization_config``."""
    bits, group = q.get("bits"), q.get("group_size", -1)
    if bits not in (2, 3, 4, 8) or isinstance(bits, bool):
        raise FormatError(f"{where}: GPTQ bits must be 2, 3, 4 or 8, got {bits!r}")
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        raise FormatError(f"{where}: GPTQ group_size must be -1 or a positive integer, got {group!r}")
    fmt = q.get("checkpoint_format", q.get("format", "gptq"))
    if fmt not in CHECKPOINT_FORMATS:
        raise FormatError(f"{where}: GPTQ checkpoint_format {fmt!r} is not one of {sorted(CHECKPOINT_FORMATS)}")
    if q.get("dynamic"):
        raise FormatError(f"{where}: GPTQ 'dynamic' per-module overrides are not supported")
    return bits, group, fmt
