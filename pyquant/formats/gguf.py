"""GGUF (llama.cpp) block formats, stored as the raw block bytes.

A weight of shape ``(N, K)`` is ``N`` rows of ``K / block_size`` blocks, each
block ``type_size`` bytes, exactly as in a GGUF file (``ne[0] = K`` is the
contiguous dimension). K must be a multiple of the block size (32 for the
legacy types, 256 for the k-quants): that is a rule of the format itself.

Tensor: ``blocks`` uint8 ``(N, K / block_size * type_size)``. The byte layout
of every block type is spelled out in :mod:`pyquant.formats.gguf_blocks`.

Fields (what :meth:`GGUF.pack` takes and :meth:`GGUF.unpack` returns), per row
of blocks, as stored:

* ``codes`` ``(N, K)``: the stored integers (Q4_0 ``0..15`` meaning ``code - 8``,
  Q8_0 signed ``-128..127``, Q3_K ``0..7`` meaning ``code - 4``, ...);
* ``d`` ``(N, K / block_size)`` fp16 block scale; ``dmin`` the same shape for the
  types with a min (Q4_1/Q5_1's ``m``, the k-quants' ``dmin``), else None;
* k-quants only: ``scales`` (and ``mins`` for Q2_K/Q4_K/Q5_K)
  ``(N, K / 256, sub-blocks)``, the integer scale of each sub-block as stored.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch

from ..errors import FormatError, ShapeError
from .base import Format, TensorSpec, register_format
from .gguf_blocks import (
    BLOCK_TYPES,
    BLOCK_TYPES_BY_ID,
    K_TYPES,
    LEGACY_TYPES,
    BlockType,
    dequantize_blocks,
    pack_k_blocks,
    pack_legacy_blocks,
    unpack_k_blocks,
    unpack_legacy_blocks,
)

__all__ = ["GGUF", "BLOCK_TYPES", "BLOCK_TYPES_BY_ID", "BlockType", "K_TYPES", "LEGACY_TYPES"]


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

    @property
    def is_k_quant(self) -> bool:
        return self.type in K_TYPES

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

    # --- packing (the byte layouts live in gguf_blocks) ------------------------
    def from_blocks(self, blocks: torch.Tensor, shape: Tuple[int, int]):
        """Wrap raw block bytes (what a quantizer or a GGUF file holds) as a QuantizedWeight."""
        from .base import QuantizedWeight

        n, k = int(shape[0]), int(shape[1])
        self.check_shape((n, k))
        return QuantizedWeight(self, {"blocks": blocks.reshape(n, -1)}, (n, k))

    def pack(
        self,
        codes: torch.Tensor,
        d: torch.Tensor,
        dmin: Optional[torch.Tensor] = None,
        scales: Optional[torch.Tensor] = None,
        mins: Optional[torch.Tensor] = None,
    ):
        """Fields (see the module docstring) -> QuantizedWeight."""
        if codes.dim() != 2:
            raise ShapeError(f"GGUF codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
        n, k = int(codes.shape[0]), int(codes.shape[1])
        self.check_shape((n, k))
        if not self.is_k_quant:
            if scales is not None or mins is not None:
                raise FormatError(f"GGUF {self.type} has no sub-block scales or mins")
            return self.from_blocks(pack_legacy_blocks(self.type, d, dmin, codes), (n, k))
        if scales is None:
            raise FormatError(f"GGUF {self.type} needs the sub-block scales")
        nb = n * (k // self.block.block_size)
        flat = lambda t: None if t is None else t.reshape(nb, -1)  # noqa: E731
        blocks = pack_k_blocks(self.type, d.reshape(nb), flat(dmin), flat(scales), flat(mins), codes.reshape(nb, -1))
        return self.from_blocks(blocks, (n, k))

    def unpack(self, qw) -> Dict[str, Optional[torch.Tensor]]:
        """QuantizedWeight -> its fields (the inverse of :meth:`pack`)."""
        n, k = qw.shape
        nb_row = k // self.block.block_size
        blocks = qw.tensors["blocks"].reshape(n * nb_row, self.block.type_size)
        if not self.is_k_quant:
            d, m, codes = unpack_legacy_blocks(self.type, blocks)
            return {"codes": codes.reshape(n, k), "d": d.view(n, nb_row),
                    "dmin": None if m is None else m.view(n, nb_row), "scales": None, "mins": None}
        f = unpack_k_blocks(self.type, blocks)
        per_row = lambda t: None if t is None else t.reshape(n, nb_row, *t.shape[1:])  # noqa: E731
        return {"codes": f["codes"].reshape(n, k), "d": f["d"].view(n, nb_row),
                "dmin": None if f["dmin"] is None else f["dmin"].view(n, nb_row),
                "scales": per_row(f["scales"]), "mins": per_row(f["mins"])}

    def decode(self, tensors: Dict[str, torch.Tensor], shape: Tuple[int, int]) -> torch.Tensor:
        """The fp32 weight ``(N, K)``: bit for bit what gguf-py and llama.cpp decode."""
        n, k = int(shape[0]), int(shape[1])
        bt = self.block
        blocks = tensors["blocks"].reshape(n * (k // bt.block_size), bt.type_size)
        return dequantize_blocks(self.type, blocks).reshape(n, k)
