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
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, Tuple

import torch

from ..errors import FormatError
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
