"""Int4 weights repacked in the order tensor-core fragments consume them.

``IntMMA`` is the 4-bit :class:`~pyquant.formats.int_format.Int` format with the
same math (``W_hat = (q - z) * s`` per group, symmetric or not, act-order through
``perm``) and a different byte layout: the one the CUDA kernel
``cuda_int4mma_qmatmul`` (csrc/cuda/int4_mma.cu) reads with one 128-bit load per
lane and turns into ``mma.sync.m16n8k16`` A fragments with one shift and four
masks per 8 codes. The repack is lossless both ways (:func:`to_mma`,
:func:`from_mma`), so a checkpoint in this layout exports to GPTQ/AWQ like any
Int weight (``unpack`` gives the plain codes, scales and zeros back).

Why the weight is the A operand
-------------------------------
The kernel computes ``y^T = W x^T``: W (N rows) is the 16x16 A operand and the
activations the 16x8 B operand, so M <= 8 rows of x fill one B tile (decode
wastes half the tensor-core work of the x-as-A orientation, which pads M to 16).

Layout
------
``N`` is padded to ``Np = ceil(N/16)*16`` and ``K`` to ``Kp = ceil(K/64)*64``
(padding codes are 0 and never read back). ``qweight`` is uint8
``(Np/16, Kp*8)``: row ``T`` holds n16 tile ``T`` (rows ``16T..16T+15``) as
``Kp/64`` blocks of 512 bytes; in block ``kb`` lane ``l = 4g + t`` (0..31) owns
bytes ``16l..16l+15``: four little-endian uint32 words, word ``j`` for the k16
step ``k0 = 64kb + 16j``. Nibble ``i`` of that word (bits ``4i..4i+3``) is the
code at row ``n0 + g + 8h``, column ``k0 + 2t + 8c + e`` with
``(h, c, e) = (i & 1, (i >> 1) & 1, i >> 2)``::

    nibble   0       1        2         3          4         5          6          7
    code   (g,2t) (g+8,2t) (g,2t+8) (g+8,2t+8) (g,2t+1) (g+8,2t+1) (g,2t+9) (g+8,2t+9)

These are the PTX ISA A-fragment registers of ``mma.m16n8k16`` (a0 = row g,
cols 2t, 2t+1; a1 = row g+8; a2 = row g, cols 2t+8, 2t+9; a3 = row g+8): the
masks ``0x000f000f`` / ``0x00f000f0`` of the word and of the word shifted by 8
leave a0 / a1 / a2 / a3 as two 16-bit halves each, low half the lower column.

``scales`` (and ``zeros``): ``(G, Np)`` in ``scale_dtype``, group-major so a
thread block reads the scales of its columns for one group with 16-byte loads;
within each block of 16 columns, column ``2i`` holds row ``i`` and ``2i + 1``
row ``i + 8`` (i < 8), so one 32-bit load gives the pair of rows a lane's
accumulators hold. Padding columns hold 0. ``perm`` is Int's.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, Tuple

import torch

from ..errors import FormatError, ShapeError
from .base import QuantizedWeight, TensorSpec, register_format
from .int_format import _DTYPE_BY_NAME, SCALE_DTYPES, Int, _check_codes

TILE_N = 16  # rows of one A tile
BLOCK_K = 64  # columns of one 512-byte block (4 k16 steps per 128-bit lane slot)
# nibble i of a word <-> (row offset 8h, column offset 8c + e) in the k16 step
NIBBLE_H = tuple(i & 1 for i in range(8))
NIBBLE_C = tuple((i >> 1) & 1 for i in range(8))
NIBBLE_E = tuple(i >> 2 for i in range(8))


def padded_shape(n: int, k: int) -> Tuple[int, int]:
    return math.ceil(n / TILE_N) * TILE_N, math.ceil(k / BLOCK_K) * BLOCK_K


def pack_mma_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``(N, K)`` in [0, 15] -> the ``qweight`` of the layout above (pure torch)."""
    if codes.dim() != 2:
        raise ShapeError(f"codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
    _check_codes(codes, 4)
    n, k = codes.shape
    np_, kp = padded_shape(n, k)
    c = torch.zeros((np_, kp), dtype=torch.int64, device=codes.device)
    c[:n, :k] = codes.to(torch.int64)
    # n = 16T + 8h + g ; k = 64kb + 16j + 8c + 2t + e
    c = c.view(np_ // 16, 2, 8, kp // 64, 4, 2, 4, 2)  # T h g kb j c t e
    c = c.permute(0, 3, 2, 6, 4, 1, 5, 7)  # T kb g t j | h c e
    shifts = 4 * (torch.arange(2).view(2, 1, 1) + 2 * torch.arange(2).view(1, 2, 1) + 4 * torch.arange(2).view(1, 1, 2))
    words = (c << shifts.to(codes.device)).sum(dim=(-3, -2, -1))  # T kb g t j
    b = torch.stack([(words >> (8 * i)) & 0xFF for i in range(4)], dim=-1)
    return b.to(torch.uint8).reshape(np_ // 16, kp * 8)


def unpack_mma_codes(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_mma_codes`: uint8 codes ``(N, K)``."""
    np_, kp = padded_shape(n, k)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (np_ // 16, kp * 8):
        raise ShapeError(
            f"int4 mma-layout codes for shape ({n}, {k}) must be uint8 {(np_ // 16, kp * 8)}, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    b = packed.to(torch.int64).view(np_ // 16, kp // 64, 8, 4, 4, 4)  # T kb g t j byte
    words = (b << (8 * torch.arange(4, device=packed.device))).sum(-1)  # T kb g t j
    nib = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # ... nibble (= h + 2c + 4e)
    nib = nib.view(np_ // 16, kp // 64, 8, 4, 4, 2, 2, 2)  # T kb g t j | e c h
    c = nib.permute(0, 7, 2, 1, 4, 6, 3, 5)  # T h g kb j c t e
    return c.reshape(np_, kp)[:n, :k].to(torch.uint8)


def _row_order(np_: int, device) -> torch.Tensor:
    """Stored column j of the scale tensors holds row ``_row_order[j]``."""
    i = torch.arange(np_, device=device)
    block, pos = i // 16, i % 16
    return block * 16 + pos // 2 + 8 * (pos % 2)


def pack_mma_scales(t: torch.Tensor) -> torch.Tensor:
    """Per-group ``(N, G)`` scales or zeros -> the stored ``(G, Np)``."""
    n, g = t.shape
    np_ = math.ceil(n / 16) * 16
    padded = torch.zeros((np_, g), dtype=t.dtype, device=t.device)
    padded[:n] = t
    return padded[_row_order(np_, t.device)].t().contiguous()


def unpack_mma_scales(t: torch.Tensor, n: int) -> torch.Tensor:
    np_ = t.shape[1]
    out = torch.empty((np_, t.shape[0]), dtype=t.dtype, device=t.device)
    out[_row_order(np_, t.device)] = t.t()
    return out[:n].contiguous()


@register_format
@dataclasses.dataclass(frozen=True)
class IntMMA(Int):
    """4-bit Int weights in the tensor-core fragment layout (module docstring)."""

    bits: int = 4
    family = "int4mma"

    def __post_init__(self):
        super().__post_init__()
        if self.bits != 4:
            raise FormatError(f"the mma layout holds 4-bit codes only, got bits={self.bits!r}")

    def spec(self) -> str:
        return "int4mma" + super().spec()[len("int4"):]

    _SPEC_RE = re.compile(r"^int4mma_(g\d+|pc)_(sym|asym)_(fp16|bf16|fp32)(_actorder)?$")

    @classmethod
    def from_spec(cls, spec: str) -> "IntMMA":
        m = cls._SPEC_RE.match(spec)
        if not m:
            raise FormatError(f"not an IntMMA format spec: {spec!r}")
        group = -1 if m.group(1) == "pc" else int(m.group(1)[1:])
        return cls(4, group, m.group(2) == "sym", _DTYPE_BY_NAME[m.group(3)], bool(m.group(4)))

    def describe(self) -> str:
        return super().describe() + " (mma layout)"

    def plain(self) -> Int:
        """The Int format with the same math in the row layout."""
        return Int(4, self.group_size, self.symmetric, self.scale_dtype, self.act_order)

    def tensor_specs(self, shape: Tuple[int, int]) -> Dict[str, TensorSpec]:
        n, k = shape
        np_, kp = padded_shape(n, k)
        ng = self.num_groups(k)
        specs = {"qweight": ((np_ // 16, kp * 8), torch.uint8), "scales": ((ng, np_), self.scale_dtype)}
        if not self.symmetric:
            specs["zeros"] = ((ng, np_), self.scale_dtype)
        if self.act_order:
            specs["perm"] = ((k,), torch.int32)
        return specs

    def pack(self, codes, scales, zeros=None, perm=None):
        plain = self.plain().pack(codes, scales, zeros, perm)  # validates like Int
        return to_mma(plain)

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_mma_codes(codes)

    def unpack_codes(self, packed: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
        return unpack_mma_codes(packed, shape[0], shape[1])

    def plain_tensors(self, tensors, shape) -> Dict[str, torch.Tensor]:
        n, k = shape
        out = {"qweight": self.plain().pack_codes(unpack_mma_codes(tensors["qweight"], n, k)),
               "scales": unpack_mma_scales(tensors["scales"], n)}
        if "zeros" in tensors:
            out["zeros"] = unpack_mma_scales(tensors["zeros"], n)
        if "perm" in tensors:
            out["perm"] = tensors["perm"]
        return out

    def decode(self, tensors, shape) -> torch.Tensor:
        return self.plain().decode(self.plain_tensors(tensors, shape), shape)

    def unpack(self, qw) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.plain().unpack(from_mma(qw))


def to_mma(qw: QuantizedWeight) -> QuantizedWeight:
    """A 4-bit Int weight -> the same weight in the mma layout (lossless)."""
    fmt = qw.format
    if isinstance(fmt, IntMMA):
        return qw
    if type(fmt) is not Int or fmt.bits != 4:
        raise FormatError(f"only 4-bit Int weights have an mma layout, got {fmt.spec()}")
    n, k = qw.shape
    t = qw.tensors
    tensors = {"qweight": pack_mma_codes(fmt.unpack_codes(t["qweight"], qw.shape)),
               "scales": pack_mma_scales(t["scales"])}
    if "zeros" in t:
        tensors["zeros"] = pack_mma_scales(t["zeros"])
    if "perm" in t:
        tensors["perm"] = t["perm"]
    mma = IntMMA(4, fmt.group_size, fmt.symmetric, fmt.scale_dtype, fmt.act_order)
    return QuantizedWeight(mma, tensors, (n, k))


def from_mma(qw: QuantizedWeight) -> QuantizedWeight:
    """Inverse of :func:`to_mma` (an Int weight passes through)."""
    fmt = qw.format
    if not isinstance(fmt, IntMMA):
        if isinstance(fmt, Int):
            return qw
        raise FormatError(f"from_mma takes an IntMMA weight, got {fmt.spec()}")
    return QuantizedWeight(fmt.plain(), fmt.plain_tensors(qw.tensors, qw.shape), qw.shape)

