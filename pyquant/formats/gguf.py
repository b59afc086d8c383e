"""GGUF (llama.cpp) block formats, stored as the raw block bytes.

A weight of shape ``(N, K)`` is ``N`` rows of ``K / block_size`` blocks, each
block ``type_size`` bytes, exactly as in a GGUF file (``ne[0] = K`` is the
contiguous dimension). K must be a multiple of the block size (32 for the
legacy types, 256 for the k-quants): that is a rule of the format itself.

Tensor: ``blocks`` uint8 ``(N, K / block_size * type_size)``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, NamedTuple, Tuple

import torch

from ..errors import FormatError, ShapeError
from .base import Format, TensorSpec, register_format


class BlockType(NamedTuple):
    name: str
    ggml_type: int  # the enum value in the GGUF tensor info
    block_size: int  # weights per block
    type_size: int  # bytes per block


BLOCK_TYPES: Dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("Q4_0", 2, 32, 18),
        BlockType("Q4_1", 3, 32, 20),
        BlockType("Q5_0", 6, 32, 22),
        BlockType("Q5_1", 7, 32, 24),
        BlockType("Q8_0", 8, 32, 34),
        BlockType("Q2_K", 10, 256, 84),
        BlockType("Q3_K", 11, 256, 110),
        BlockType("Q4_K", 12, 256, 144),
        BlockType("Q5_K", 13, 256, 176),
        BlockType("Q6_K", 14, 256, 210),
    )
}
BLOCK_TYPES_BY_ID = {t.ggml_type: t for t in BLOCK_TYPES.values()}


@register_format
@dataclasses.dataclass(frozen=True)
class GGUF(Format):
    type: str = "Q4_K"

    family = "gguf"

    def __post_init__(self):
        name = self.type.upper() if isinstance(self.type, str) else self.type
        if name not in BLOCK_TYPES:
            raise FormatError(f"unsupported GGUF block type {self.type!r}; supported: {list(BLOCK_TYPES)}")
        object.__setattr__(self, "type", name)

    @property
    def block(self) -> BlockType:
        return BLOCK_TYPES[self.type]

    def spec(self) -> str:
        return f"gguf_{self.type.lower()}"

    @classmethod
    def from_spec(cls, spec: str) -> "GGUF":
        if not spec.startswith("gguf_"):
            raise FormatError(f"not a GGUF format spec: {spec!r}")
        return cls(spec[5:].upper())

    def describe(self) -> str:
        return f"gguf {self.type}"

    def check_shape(self, shape: Tuple[int, int]) -> None:
        super().check_shape(shape)
        if shape[1] % self.block.block_size:
            raise ShapeError(
                f"GGUF {self.type} needs in_features divisible by its block size {self.block.block_size}, "
                f"got in_features={shape[1]}"
            )

    def tensor_specs(self, shape: Tuple[int, int]) -> Dict[str, TensorSpec]:
        n, k = shape
        b = self.block
        return {"blocks": ((n, k // b.block_size * b.type_size), torch.uint8)}
