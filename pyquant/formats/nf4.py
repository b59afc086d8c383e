"""NF4 (QLoRA's 4-bit NormalFloat), byte-compatible with bitsandbytes.

Layout follows ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``:
the weight is flattened row-major and cut into blocks of ``block_size``
values (blocks may span rows: bitsandbytes does not care about rows). Each
block stores its absolute maximum; each value stores the index of the nearest
entry of the NF4 codebook to ``w / absmax``. Two codes per byte, the *first*
value in the high nibble (bitsandbytes' order).

Tensors:
* ``qweight``: uint8 ``(ceil(N*K/2),)``
* without double quantization: ``absmax`` fp32 ``(nblocks,)``
* with double quantization (QLoRA's "nested" statistics): ``absmax_q`` uint8
  ``(nblocks,)``: codes of bitsandbytes' signed dynamic 8-bit map for
  ``absmax - absmax_offset``, in blocks of 256 with fp32 ``absmax_scale``
  ``(ceil(nblocks/256),)``; ``absmax_offset`` fp32 ``(1,)`` is the mean of the
  absmax values.

Decode (the spec every NF4 kernel is tested against)
----------------------------------------------------
Decode of one value at flat (row-major) index ``i`` of an ``(N, K)`` weight::

    q      = nibble i of qweight (even i: high nibble of byte i // 2, odd i: low)
    W[i]   = NF4_CODEBOOK[q] * absmax[i // block_size]            (one fp32 multiply)

With double quantization the fp32 ``absmax`` is itself decoded first, in two
separately rounded fp32 operations (bitsandbytes computes them as two passes,
so no fused multiply-add)::

    absmax[b] = DYNAMIC_MAP[absmax_q[b]] * absmax_scale[b // 256] + absmax_offset

``DYNAMIC_MAP`` is bitsandbytes' signed dynamic 8-bit map
(``create_dynamic_map(signed=True)``), rebuilt here by :func:`dynamic_map`.

When ``N * K`` is odd the last byte's low nibble is padding; it holds 7 (the
code of 0.0), which is what bitsandbytes writes, and is never read back.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Dict, Optional, Tuple

import torch

from ..errors import DtypeError, FormatError, ShapeError, ValueRangeError
from .base import Format, TensorSpec, register_format

NESTED_BLOCK_SIZE = 256

# The 16 NF4 levels (quantiles of N(0, 1) normalised to [-1, 1]), as fp32 values
# exactly as bitsandbytes stores them.
NF4_CODEBOOK = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


# Code of 0.0 in the NF4 codebook: bitsandbytes pads an odd tail with a 0.0
# value before packing, so the unused low nibble of the last byte is 7.
PAD_CODE = 7


@functools.lru_cache(maxsize=None)
def _codebook_cpu() -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32)


def nf4_codebook(device=None) -> torch.Tensor:
    """The 16 NF4 levels as an fp32 tensor (index = 4-bit code)."""
    cb = _codebook_cpu()
    return cb if device is None else cb.to(device)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed dynamic tree quantization map (Dettmers, "8-bit approximations for
    # parallelism in deep learning"): with 7 exponent bits, exponent level i
    # (value scale 10**(i-6)) owns 2**i linearly spaced fractions, each the
    # midpoint of consecutive points of linspace(0.1, 1, 2**i + 1), for both
    # signs; plus 0 and 1: 2 * 127 + 2 = 256 entries, sorted. The fp32 steps
    # (linspace and midpoints in fp32, the power of ten rounded to fp32 before
    # the multiply) are what make the values identical to bitsandbytes' map.
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = torch.tensor(10.0 ** (i - 6), dtype=torch.float32)
        values.append(mids * scale)
        values.append(-(mids * scale))
    values.append(torch.tensor([0.0, 1.0], dtype=torch.float32))
    out, _ = torch.sort(torch.cat(values))
    assert out.numel() == 256
    return out


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map(signed=True)``: 256 sorted fp32 values in [-1, 1]."""
    m = _dynamic_map_cpu()
    return m if device is None else m.to(device)


def nf4_pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``(N, K)`` or flat into ``qweight`` uint8 ``(ceil(numel/2),)``.

    Value ``2j`` goes to the high nibble of byte ``j``, value ``2j+1`` to the
    low nibble; an odd tail is padded with :data:`PAD_CODE`.
    """
    if not isinstance(codes, torch.Tensor):
        raise DtypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise DtypeError(f"NF4 codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() == 0:
        raise ShapeError("NF4 codes are empty")
    if bool(((flat < 0) | (flat > 15)).any()):
        bad = int(((flat < 0) | (flat > 15)).nonzero()[0])
        raise ValueRangeError(f"NF4 codes must be in [0, 15]; code {int(flat[bad])} at flat index {bad}")
    flat = flat.to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), PAD_CODE)])
    return (flat[0::2] << 4) | flat[1::2]


def nf4_unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`nf4_pack_codes`: uint8 codes ``(numel,)``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise DtypeError(f"NF4 qweight must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    flat = packed.reshape(-1)
    if flat.numel() != (numel + 1) // 2:
        raise ShapeError(f"NF4 qweight for {numel} values must hold {(numel + 1) // 2} bytes, got {flat.numel()}")
    out = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return out[:numel]


def nf4_decode_absmax(fmt: "NF4", t: Dict[str, torch.Tensor], nblocks: int) -> torch.Tensor:
    """The fp32 per-block absmax ``(nblocks,)``, decoding double quantization if used."""
    if not fmt.double_quant:
        return t["absmax"].to(torch.float32)
    q = t["absmax_q"].long()
    scale = t["absmax_scale"].to(torch.float32).repeat_interleave(NESTED_BLOCK_SIZE)[:nblocks]
    # Two rounded fp32 operations, in this order (see the module docstring).
    prod = dynamic_map(q.device)[q] * scale
    return prod + t["absmax_offset"].to(torch.float32)


def nf4_dequantize(fmt: "NF4", t: Dict[str, torch.Tensor], shape) -> torch.Tensor:
    """The fp32 weight ``(N, K)`` stored in the NF4 tensors ``t``."""
    n, k = shape
    numel = n * k
    nb = fmt.num_blocks(shape)
    bs = fmt.block_size
    codes = nf4_unpack_codes(t["qweight"], numel).long()
    vals = nf4_codebook(codes.device)[codes]
    absmax = nf4_decode_absmax(fmt, t, nb)
    pad = nb * bs - numel
    if pad:
        vals = torch.cat([vals, vals.new_zeros(pad)])
    w = (vals.view(nb, bs) * absmax.view(nb, 1)).view(-1)[:numel]
    return w.view(n, k)


@register_format
@dataclasses.dataclass(frozen=True)
class NF4(Format):
    block_size: int = 64
    double_quant: bool = False

    family = "nf4"

    def __post_init__(self):
        bs = self.block_size
        if not isinstance(bs, int) or bs < 32 or bs > 4096 or bs & (bs - 1):
            raise FormatError(f"NF4 block_size must be a power of two in [32, 4096], got {bs!r}")

    def spec(self) -> str:
        return f"nf4_b{self.block_size}" + ("_dq" if self.double_quant else "")

    _SPEC_RE = re.compile(r"^nf4_b(\d+)(_dq)?$")

    @classmethod
    def matches_spec(cls, spec: str) -> bool:
        return bool(cls._SPEC_RE.match(spec))

    @classmethod
    def from_spec(cls, spec: str) -> "NF4":
        m = cls._SPEC_RE.match(spec)
        if not m:
            raise FormatError(f"not an NF4 format spec: {spec!r}")
        return cls(int(m.group(1)), bool(m.group(2)))

    def describe(self) -> str:
        return f"nf4 block {self.block_size}" + (" double-quant" if self.double_quant else "")

    def num_blocks(self, shape: Tuple[int, int]) -> int:
        return math.ceil(shape[0] * shape[1] / self.block_size)

    def tensor_specs(self, shape: Tuple[int, int]) -> Dict[str, TensorSpec]:
        numel = shape[0] * shape[1]
        nb = self.num_blocks(shape)
        specs = {"qweight": (((numel + 1) // 2,), torch.uint8)}
        if self.double_quant:
            specs["absmax_q"] = ((nb,), torch.uint8)
            specs["absmax_scale"] = ((math.ceil(nb / NESTED_BLOCK_SIZE),), torch.float32)
            specs["absmax_offset"] = ((1,), torch.float32)
        else:
            specs["absmax"] = ((nb,), torch.float32)
        return specs

    # --- packing (the only place that knows NF4's bits) ------------------------
    def pack(
        self,
        codes: torch.Tensor,
        absmax: Optional[torch.Tensor] = None,
        *,
        absmax_q: Optional[torch.Tensor] = None,
        absmax_scale: Optional[torch.Tensor] = None,
        absmax_offset: Optional[torch.Tensor] = None,
    ):
        """4-bit codes ``(N, K)`` plus block statistics -> QuantizedWeight.

        Plain NF4 takes the fp32 ``absmax`` per block; double quantization takes
        the nested statistics ``absmax_q`` / ``absmax_scale`` / ``absmax_offset``.
        """
        from .base import QuantizedWeight

        if codes.dim() != 2:
            raise ShapeError(f"NF4 codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
        shape = (int(codes.shape[0]), int(codes.shape[1]))
        self.check_shape(shape)
        tensors = {"qweight": nf4_pack_codes(codes)}
        nested = {"absmax_q": absmax_q, "absmax_scale": absmax_scale, "absmax_offset": absmax_offset}
        if self.double_quant:
            missing = [k for k, v in nested.items() if v is None]
            if missing or absmax is not None:
                raise FormatError(
                    f"{self.spec()} stores nested statistics {list(nested)}; missing {missing}"
                    + (", and got a plain absmax" if absmax is not None else "")
                )
            tensors.update(nested)
        else:
            if absmax is None or any(v is not None for v in nested.values()):
                raise FormatError(f"{self.spec()} stores one fp32 absmax per block and no nested statistics")
            tensors["absmax"] = absmax
        return QuantizedWeight(self, tensors, shape)

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return nf4_pack_codes(codes)

    def unpack_codes(self, packed: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
        return nf4_unpack_codes(packed, shape[0] * shape[1]).view(shape)

    def decode(self, tensors: Dict[str, torch.Tensor], shape: Tuple[int, int]) -> torch.Tensor:
        return nf4_dequantize(self, tensors, shape)

