"""Group-wise integer weights: 2, 3, 4 or 8 bits, symmetric or with zero points.

Math
----
A weight ``W`` of shape ``(N, K)`` (out, in) is cut along K into groups of
``group_size`` columns (``group_size=-1``: one group per row). The last group
may be shorter ("ragged") when ``group_size`` does not divide K. Each group has
a scale ``s`` and a zero point ``z`` (both stored in ``scale_dtype``)::

    W_hat[n, k] = (q[n, k] - z[n, g]) * s[n, g]        g = k // group_size

computed in fp32. Codes ``q`` are unsigned, in ``[0, 2**bits)``. Symmetric
weights store no zeros: ``z = 2**(bits-1)`` implicitly. Zero points are stored
as floats, so integer zeros (GPTQ, AWQ, RTN) and float zeros (HQQ) share one
layout; the GPTQ/AWQ converters require them to be integral.

Layout (the part kernels care about)
------------------------------------
``qweight``: uint8 ``(N, Kp * bits / 8)`` with ``Kp = ceil(K / 32) * 32``. Each
row is a sequence of 32-code chunks (padding codes are 0 and never read back).
Within a chunk ``c[0..31]``:

* 8 bits: byte j = c[j].
* 4 bits: byte j (0..15) = c[j] | c[j+16] << 4. One 16-byte load gives codes
  0..15 in the low nibbles and 16..31 in the high nibbles, in order: a SIMD
  kernel needs one AND and one shift, no shuffle (the Q4_0 trick of llama.cpp).
* 2 bits: byte j (0..7) = c[j] | c[j+8] << 2 | c[j+16] << 4 | c[j+24] << 6.
* 3 bits: bytes 0..7 hold the low two bits of each code in the 2-bit layout,
  bytes 8..11 a little-endian uint32 whose bit j is bit 2 of c[j] (a high-bit
  plane, as in Q3_K): every code is reachable with shifts and masks only.

Each row is a whole number of 32-bit words (12 bytes per chunk at 3 bits).

``scales`` (and ``zeros`` when asymmetric): ``(N, num_groups)`` in
``scale_dtype``. ``perm`` (only with ``act_order``): int32 ``(K,)``; the stored
matrix is ``W[:, perm]``, i.e. column j of the packed matrix is column
``perm[j]`` of the logical weight (GPTQ's desc_act after sorting by g_idx).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, Optional, Tuple

import torch

from ..errors import DtypeError, FormatError, ShapeError
from .base import Format, TensorSpec, register_format

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256, -1)
SCALE_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_DTYPE_BY_NAME = {v: k for k, v in SCALE_DTYPES.items()}
CHUNK = 32  # codes per packing chunk; rows are padded to a multiple of it


@register_format
@dataclasses.dataclass(frozen=True)
class Int(Format):
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.float16
    act_order: bool = False

    family = "int"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise FormatError(f"Int bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise FormatError(
                f"Int group_size must be one of {SUPPORTED_GROUP_SIZES} (-1 = per channel), got {self.group_size!r}"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise DtypeError(f"Int scale_dtype must be float16, bfloat16 or float32, got {self.scale_dtype}")

    # --- identity -----------------------------------------------------------
    def spec(self) -> str:
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        s = "sym" if self.symmetric else "asym"
        tail = "_actorder" if self.act_order else ""
        return f"int{self.bits}_{g}_{s}_{SCALE_DTYPES[self.scale_dtype]}{tail}"

    _SPEC_RE = re.compile(r"^int(\d+)_(g\d+|pc)_(sym|asym)_(fp16|bf16|fp32)(_actorder)?$")

    @classmethod
    def matches_spec(cls, spec: str) -> bool:
        return bool(cls._SPEC_RE.match(spec))

    @classmethod
    def from_spec(cls, spec: str) -> "Int":
        m = cls._SPEC_RE.match(spec)
        if not m:
            raise FormatError(f"not an Int format spec: {spec!r}")
        group = -1 if m.group(2) == "pc" else int(m.group(2)[1:])
        return cls(int(m.group(1)), group, m.group(3) == "sym", _DTYPE_BY_NAME[m.group(4)], bool(m.group(5)))

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"

    # --- layout -------------------------------------------------------------
    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_size_for(in_features))

    def packed_row_bytes(self, in_features: int) -> int:
        return math.ceil(in_features / CHUNK) * CHUNK * self.bits // 8

    @property
    def zero_point(self) -> int:
        """Implicit zero of symmetric weights, and the code of 0.0."""
        return 1 << (self.bits - 1)

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    def tensor_specs(self, shape: Tuple[int, int]) -> Dict[str, TensorSpec]:
        n, k = shape
        ng = self.num_groups(k)
        specs = {
            "qweight": ((n, self.packed_row_bytes(k)), torch.uint8),
            "scales": ((n, ng), self.scale_dtype),
        }
        if not self.symmetric:
            specs["zeros"] = ((n, ng), self.scale_dtype)
        if self.act_order:
            specs["perm"] = ((k,), torch.int32)
        return specs

    # --- packing ------------------------------------------------------------
    def pack(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: Optional[torch.Tensor] = None,
        perm: Optional[torch.Tensor] = None,
    ):
        """Codes ``(N, K)`` in [0, 2**bits) plus per-group scales/zeros -> QuantizedWeight.

        With ``act_order``, ``codes``/``scales``/``zeros`` describe the permuted
        matrix ``W[:, perm]``.
        """
        from .base import QuantizedWeight

        if codes.dim() != 2:
            raise ShapeError(f"codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
        shape = (codes.shape[0], codes.shape[1])
        self.check_shape(shape)
        tensors = {"qweight": pack_codes(codes, self.bits), "scales": scales.to(self.scale_dtype)}
        if not self.symmetric:
            if zeros is None:
                raise FormatError(f"asymmetric format {self.spec()} needs zero points")
            tensors["zeros"] = zeros.to(self.scale_dtype)
        elif zeros is not None:
            raise FormatError(f"symmetric format {self.spec()} stores no zero points; got a zeros tensor")
        if self.act_order:
            if perm is None:
                raise FormatError(f"format {self.spec()} needs the column permutation perm")
            tensors["perm"] = perm.to(torch.int32)
        elif perm is not None:
            raise FormatError(f"format {self.spec()} has no act_order; got a perm tensor")
        return QuantizedWeight(self, tensors, shape)

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_codes(codes, self.bits)

    def unpack_codes(self, packed: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
        return unpack_codes(packed, self.bits, shape[1])

    def decode(self, tensors: Dict[str, torch.Tensor], shape: Tuple[int, int]) -> torch.Tensor:
        """``W_hat = (q - z) * s`` in fp32, scattered back through ``perm`` with act_order."""
        n, k = shape
        codes = unpack_codes(tensors["qweight"], self.bits, k).to(torch.float32)
        g = self.group_size_for(k)
        scales = tensors["scales"].to(torch.float32).repeat_interleave(g, dim=1)[:, :k]
        if self.symmetric:
            w = (codes - float(self.zero_point)) * scales
        else:
            zeros = tensors["zeros"].to(torch.float32).repeat_interleave(g, dim=1)[:, :k]
            w = (codes - zeros) * scales
        if self.act_order:
            out = torch.empty_like(w)
            out[:, tensors["perm"].long()] = w
            w = out
        return w

    def unpack(self, qw) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """QuantizedWeight -> (codes uint8 (N, K), scales, zeros) in stored order.

        Symmetric weights get their implicit zero point as a full tensor.
        """
        n, k = qw.shape
        codes = unpack_codes(qw.tensors["qweight"], self.bits, k)
        scales = qw.tensors["scales"]
        zeros = qw.tensors.get("zeros")
        if zeros is None:
            zeros = torch.full_like(scales, float(self.zero_point))
        return codes, scales, zeros


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise DtypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise FormatError(
            f"codes for {bits}-bit packing must lie in [0, {(1 << bits) - 1}], got range "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pure-torch spec of the Int layout (see module docstring)."""
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if codes.dim() != 2:
        raise ShapeError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    _check_codes(codes, bits)
    n, k = codes.shape
    kp = math.ceil(k / CHUNK) * CHUNK
    c = torch.zeros((n, kp), dtype=torch.int32, device=codes.device)
    c[:, :k] = codes.to(torch.int32)
    c = c.view(n, kp // CHUNK, CHUNK)
    if bits == 8:
        out = c
    elif bits == 4:
        out = c[..., :16] | (c[..., 16:] << 4)
    elif bits == 2:
        out = c[..., 0:8] | (c[..., 8:16] << 2) | (c[..., 16:24] << 4) | (c[..., 24:32] << 6)
    else:  # 3 bits: 2-bit plane + high-bit plane
        lo = c & 3
        low_bytes = lo[..., 0:8] | (lo[..., 8:16] << 2) | (lo[..., 16:24] << 4) | (lo[..., 24:32] << 6)
        hi = (c >> 2) & 1
        # bit j of the little-endian uint32 lives in byte j // 8, bit j % 8
        hi_bytes = (hi.view(n, kp // CHUNK, 4, 8) << torch.arange(8, device=codes.device, dtype=torch.int32)).sum(-1)
        out = torch.cat([low_bytes, hi_bytes], dim=-1)
    return out.to(torch.uint8).reshape(n, -1)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of shape ``(N, in_features)``."""
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(f"packed codes must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    n = packed.shape[0]
    kp = math.ceil(in_features / CHUNK) * CHUNK
    if packed.shape[1] != kp * bits // 8:
        raise ShapeError(
            f"{bits}-bit packed rows for in_features={in_features} must be {kp * bits // 8} bytes, got {packed.shape[1]}"
        )
    p = packed.to(torch.int32).view(n, kp // CHUNK, CHUNK * bits // 8)
    if bits == 8:
        c = p
    elif bits == 4:
        c = torch.cat([p & 0xF, p >> 4], dim=-1)
    elif bits == 2:
        c = torch.cat([(p >> s) & 3 for s in (0, 2, 4, 6)], dim=-1)
    else:
        low = p[..., :8]
        lo = torch.cat([(low >> s) & 3 for s in (0, 2, 4, 6)], dim=-1)
        hb = p[..., 8:12]
        hi = ((hb.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.int32)) & 1).reshape(
            n, kp // CHUNK, CHUNK
        )
        c = lo | (hi << 2)
    return c.reshape(n, kp)[:, :in_features].to(torch.uint8)
