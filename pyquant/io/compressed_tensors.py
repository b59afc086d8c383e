"""Lossless conversion between compressed-tensors checkpoints and pyquant's Int format.

compressed-tensors is the layout llm-compressor writes and vLLM / SGLang serve.
Weight-only integer quantization is stored per linear layer as

* ``weight_packed`` int32 ``(N, ceil(K * bits / 32))``: the codes ``q + 2**(bits-1)``
  (``q`` signed, in ``[-2**(bits-1), 2**(bits-1))``) laid as a little-endian bit
  stream along K, the tail of each row padded with zero bits ("pack-quantized");
  ``naive-quantized`` / ``int-quantized`` store ``weight`` int8 ``(N, K)`` = ``q``;
* ``weight_scale`` ``(N, num_groups)`` (``(N, 1)`` per channel, ``(1,)`` per tensor)
  in the model's dtype;
* asymmetric only: ``weight_zero_point``, signed like ``q``; pack-quantized packs
  it along N: int32 ``(ceil(N * bits / 32), num_groups)``;
* ``weight_shape`` int64 ``(2,)``: ``(N, K)``;
* act-order checkpoints: ``weight_g_idx`` int32 ``(K,)``, the group of each column.

``w = (q - zero_point) * scale``. With ``code = q + 2**(bits-1)`` and ``z =
zero_point + 2**(bits-1)`` this is pyquant's ``(code - z) * scale``, and the
symmetric case (zero point 0) is pyquant's symmetric Int, whose implicit zero
is ``2**(bits-1)``: every stored integer maps one to one, nothing is rounded.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import DtypeError, FormatError, ShapeError
from ..formats import Int, QuantizedWeight
from .int32_bitstream import pack_int32, unpack_int32
from .int_layout import exact_scales, integer_zeros, original_columns, perm_from_g_idx, row_layout

PACKED_FORMAT = "pack-quantized"
UNPACKED_FORMATS = ("naive-quantized", "int-quantized")
_STRATEGIES = ("group", "channel", "tensor")
MAX_TARGET_CHARS = 512


def _pack_padded(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """compressed-tensors' stream: GPTQ's, padded with zero codes to whole 32-value
    chunks, then cut to the ``ceil(count * bits / 32)`` words that hold real codes."""
    length = values.shape[dim]
    pad = -length % 32
    if pad:
        shape = list(values.shape)
        shape[dim] = pad
        values = torch.cat([values.to(torch.int64), values.new_zeros(shape, dtype=torch.int64)], dim=dim)
    return pack_int32(values, bits, dim).narrow(dim, 0, _words(length, bits)).contiguous()


def _words(count: int, bits: int) -> int:
    return -(-count * bits // 32)


class WeightArgs:
    """The parts of a compressed-tensors ``weights`` quantization args pyquant uses."""

    def __init__(self, args: Mapping, where: str, storage: str):
        if not isinstance(args, Mapping):
            raise FormatError(f"{where}: weights args must be an object, got {type(args).__name__}")
        self.bits = args.get("num_bits")
        self.symmetric = args.get("symmetric", True)
        self.strategy = args.get("strategy")
        self.group_size = args.get("group_size")
        self.storage = storage
        if args.get("type", "int") != "int":
            raise FormatError(f"{where}: weights type {args.get('type')!r} is not supported (only 'int')")
        if self.bits not in (2, 3, 4, 8) or isinstance(self.bits, bool):
            raise FormatError(f"{where}: num_bits must be 2, 3, 4 or 8 for pyquant's Int, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise FormatError(f"{where}: symmetric must be true or false, got {self.symmetric!r}")
        if self.strategy not in _STRATEGIES:
            raise FormatError(f"{where}: strategy {self.strategy!r} is not supported (one of {_STRATEGIES})")
        if self.strategy == "group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
                raise FormatError(f"{where}: group strategy needs a positive group_size, got {self.group_size!r}")
        if storage == PACKED_FORMAT:
            pass
        elif storage in UNPACKED_FORMATS:
            if self.bits != 8:
                raise FormatError(f"{where}: {storage} stores int8 weights, got num_bits={self.bits}")
        else:
            raise FormatError(
                f"{where}: compressed-tensors format {storage!r} is not supported "
                f"({PACKED_FORMAT!r}, {', '.join(repr(f) for f in UNPACKED_FORMATS)})"
            )


def _stored_integers(t: torch.Tensor, name: str, shape, weight_shape, bits: int, packed_dim: int, storage: str):
    """Unsigned codes of ``shape``: an int32 stream packed along ``packed_dim`` (pack-quantized)
    or signed int8 values (the unpacked layouts), after checking the stored dtype and shape."""
    if storage == PACKED_FORMAT:
        want = list(shape)
        want[packed_dim] = _words(shape[packed_dim], bits)
        if t.dtype != torch.int32 or list(t.shape) != want:
            raise FormatError(
                f"{name} for shape {tuple(weight_shape)} at {bits} bits must be int32 {tuple(want)}, "
                f"got {t.dtype} {tuple(t.shape)}"
            )
        return unpack_int32(t, bits, packed_dim, shape[packed_dim])
    if t.dtype != torch.int8 or tuple(t.shape) != tuple(shape):
        raise FormatError(f"{name} for shape {tuple(weight_shape)} must be int8 {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
    return t.to(torch.int64) + (1 << (bits - 1))


def import_layer(tensors: Mapping[str, torch.Tensor], args: WeightArgs) -> QuantizedWeight:
    """An Int QuantizedWeight from one layer's compressed-tensors tensors (names without the layer prefix)."""
    bits, mid = args.bits, 1 << (args.bits - 1)
    shape_t = tensors.get("weight_shape")
    key = "weight_packed" if args.storage == PACKED_FORMAT else "weight"
    data = tensors.get(key)
    scale = tensors.get("weight_scale")
    for name, t in ((key, data), ("weight_scale", scale)):
        if t is None:
            raise FormatError(f"compressed-tensors layer has no {name!r} tensor (has {sorted(tensors)})")
    if shape_t is not None:
        if shape_t.dtype not in (torch.int64, torch.int32) or shape_t.numel() != 2:
            raise FormatError(f"weight_shape must hold 2 integers, got {shape_t.dtype} {tuple(shape_t.shape)}")
        n, k = (int(v) for v in shape_t.tolist())
    elif args.storage != PACKED_FORMAT:
        n, k = data.shape if data.dim() == 2 else (0, 0)
    else:
        raise FormatError("pack-quantized layer has no 'weight_shape' tensor")
    if n < 1 or k < 1:
        raise ShapeError(f"weight shape must be positive, got {(n, k)}")
    codes = _stored_integers(data, key, (n, k), (n, k), bits, 1, args.storage)
    if not scale.is_floating_point() or scale.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DtypeError(f"weight_scale must be float16, bfloat16 or float32, got {scale.dtype}")
    group = args.group_size if args.strategy == "group" else -1
    if group != -1 and group == k:
        group = -1
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None and group == -1:
        g_idx = None  # a single group per row: any g_idx is trivial
    ng = -(-k // group) if group != -1 else 1
    if args.strategy == "tensor":
        if scale.numel() != 1:
            raise ShapeError(f"per-tensor weight_scale must hold one value, got shape {tuple(scale.shape)}")
        scale = scale.reshape(1, 1).expand(n, 1)
    elif tuple(scale.shape) != (n, ng):
        raise ShapeError(f"weight_scale for shape {(n, k)} must be {(n, ng)}, got {tuple(scale.shape)}")
    zeros = None
    if not args.symmetric:
        zp = tensors.get("weight_zero_point")
        if zp is None:
            raise FormatError("asymmetric compressed-tensors layer has no 'weight_zero_point' tensor")
        if args.strategy == "tensor":
            if zp.numel() != 1 or zp.dtype not in (torch.int8, torch.int32):
                raise FormatError(f"per-tensor weight_zero_point must be one integer, got {zp.dtype} {tuple(zp.shape)}")
            z = zp.reshape(1, 1).to(torch.int64).expand(n, 1) + mid
        else:
            z = _stored_integers(zp, "weight_zero_point", (n, ng), (n, k), bits, 0, args.storage)
        if int(z.min()) < 0 or int(z.max()) >= (1 << bits):
            raise FormatError(f"weight_zero_point values fall outside the {bits}-bit range")
        zeros = z.to(torch.float32)
    perm = None
    if g_idx is not None:
        perm = perm_from_g_idx(g_idx, k, group, ng, "compressed-tensors weight_g_idx:")
        if perm is not None:
            codes = codes[:, perm]
    fmt = Int(bits, group, args.symmetric, scale.dtype, perm is not None)
    return fmt.pack(
        codes.to(torch.uint8), scale.contiguous(), zeros, perm=None if perm is None else perm.to(torch.int32)
    )


def export_layer(qw: QuantizedWeight, scale_dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """One layer's pack-quantized tensors from an Int weight (integral zeros).

    ``scale_dtype``: the dtype of ``weight_scale`` (the model's; compressed-tensors
    keeps scales in it). Scales that dtype cannot hold exactly are refused.
    """
    if not isinstance(qw, QuantizedWeight):
        raise FormatError(f"expected a pyquant QuantizedWeight, got {type(qw).__name__}")
    qw = row_layout(qw)
    fmt = qw.format
    if not isinstance(fmt, Int):
        raise FormatError(f"compressed-tensors int checkpoints hold Int weights, got {fmt.spec()}")
    n, k = qw.shape
    codes, scales, zeros = fmt.unpack(qw)
    codes, g_idx = original_columns(qw, codes)
    out = {
        "weight_packed": _pack_padded(codes.long(), fmt.bits, 1),
        "weight_scale": exact_scales(scales, scale_dtype or scales.dtype, "compressed-tensors (the model's dtype)"),
    }
    if not fmt.symmetric:
        out["weight_zero_point"] = _pack_padded(integer_zeros(fmt, zeros, "compressed-tensors"), fmt.bits, 0)
    out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    if fmt.act_order:
        out["weight_g_idx"] = g_idx
    return out


def weight_args(fmt: Int, in_features: int) -> Dict:
    """The ``weights`` quantization args of a layer of ``fmt`` with ``in_features`` columns.

    compressed-tensors needs whole groups: one group spanning the row is written
    as per-channel, other ragged rows are refused.
    """
    groups = fmt.num_groups(in_features)
    per_channel = fmt.group_size == -1 or groups == 1
    if not per_channel and in_features % fmt.group_size:
        raise ShapeError(
            f"compressed-tensors needs in_features divisible by group_size: {in_features} % {fmt.group_size} != 0"
        )
    return {
        "num_bits": fmt.bits,
        "type": "int",
        "symmetric": fmt.symmetric,
        "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else fmt.group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": "group" if fmt.act_order else None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def quantization_config(groups: Mapping[Tuple, Tuple[Dict, List[str]]], ignore: List[str]) -> Dict:
    """A ``quantization_config``: one config group per distinct weight args.

    ``groups``: key -> (weights args, layer names). A single group targets
    ``Linear`` (every linear but ``ignore``); several target their layers by name.
    """
    config_groups = {}
    single = len(groups) == 1
    for i, (args, names) in enumerate(groups.values()):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else sorted(names),
            "weights": args,
            "input_activations": None,
            "output_activations": None,
            "format": PACKED_FORMAT,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": PACKED_FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


class Scheme:
    """A parsed ``quantization_config``: which weight args each layer uses."""

    def __init__(self, q: Mapping, where: str):
        if q.get("quant_method") != "compressed-tensors":
            raise FormatError(f"{where}: quant_method is {q.get('quant_method')!r}, not 'compressed-tensors'")
        status = q.get("quantization_status", "compressed")
        if status != "compressed":
            raise FormatError(f"{where}: quantization_status {status!r}: only compressed checkpoints hold packed weights")
        if q.get("sparsity_config"):
            raise FormatError(f"{where}: sparse compressed-tensors checkpoints are not supported")
        if q.get("transform_config"):
            raise FormatError(f"{where}: checkpoints with weight transforms (transform_config) are not supported")
        groups = q.get("config_groups")
        if not isinstance(groups, Mapping) or not groups:
            raise FormatError(f"{where}: config_groups must be a non-empty object")
        top_format = q.get("format", PACKED_FORMAT)
        self.where = where
        self.groups = []
        for gname, g in groups.items():
            if not isinstance(g, Mapping):
                raise FormatError(f"{where}: config group {gname!r} must be an object")
            if g.get("input_activations") or g.get("output_activations"):
                raise FormatError(
                    f"{where}: config group {gname!r} quantizes activations; pyquant imports weight-only checkpoints"
                )
            targets = g.get("targets", [])
            if not isinstance(targets, list) or not all(isinstance(t, str) and len(t) <= MAX_TARGET_CHARS for t in targets):
                raise FormatError(f"{where}: targets of {gname!r} must be a list of short strings")
            storage = g.get("format") or top_format
            self.groups.append((gname, targets, WeightArgs(g.get("weights"), f"{where} group {gname!r}", storage)))

    def args_for(self, name: str) -> WeightArgs:
        if len(self.groups) == 1:
            return self.groups[0][2]
        hits = [(g, a) for g, targets, a in self.groups if any(_matches(name, t) for t in targets)]
        if len(hits) != 1:
            found = "no config group" if not hits else f"several config groups ({[g for g, _ in hits]})"
            raise FormatError(f"{self.where}: layer {name!r} matches {found}")
        return hits[0][1]


def _matches(name: str, target: str) -> bool:
    """compressed-tensors' target rule for a linear layer: its class, its name, or ``re:`` a pattern."""
    if target == "Linear" or target == name:
        return True
    if target.startswith("re:"):
        try:
            return re.match(target[3:], name) is not None
        except re.error as exc:
            raise FormatError(f"target {target!r} is not a valid regular expression ({exc})") from None
    return False


LAYER_MARKERS = ("weight_packed", "weight_scale")
LAYER_TENSORS = ("weight_packed", "weight", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
