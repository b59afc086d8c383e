"""Little-endian bit streams in int32 words: how GPTQ and AWQ checkpoints pack codes.

Values ``v[0], v[1], ...`` of ``bits`` bits are laid one after another into a
stream of bits, value j at stream bit ``bits * j``, and the stream is cut into
32-bit words. For 2, 4 and 8 bits no value straddles a word; at 3 bits (32
values in 3 words, AutoGPTQ's layout) values 10 and 21 do.
"""
from __future__ import annotations

import torch

from ..errors import ShapeError


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer ``values`` along ``dim`` into int32 words (the stream layout)."""
    v = values.to(torch.int64).movedim(dim, -1)
    length = v.shape[-1]
    if (length * bits) % 32:
        raise ShapeError(f"{length} values of {bits} bits do not fill whole int32 words")
    nwords = length * bits // 32
    bit_pos = torch.arange(length, device=v.device) * bits
    words = torch.zeros((*v.shape[:-1], nwords), dtype=torch.int64, device=v.device)
    word, offset = bit_pos // 32, bit_pos % 32
    words.index_add_(-1, word, (v << offset) & 0xFFFFFFFF)
    spill = offset + bits > 32  # the part of a straddling value that lands in the next word
    if bool(spill.any()):
        idx = spill.nonzero().flatten()
        words.index_add_(-1, word[idx] + 1, v[..., idx] >> (32 - offset[idx]))
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).movedim(-1, dim)


def unpack_int32(words: torch.Tensor, bits: int, dim: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``count`` values along ``dim`` (int64)."""
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    if count * bits > w.shape[-1] * 32:
        raise ShapeError(f"{w.shape[-1]} int32 words hold fewer than {count} values of {bits} bits")
    bit_pos = torch.arange(count, device=w.device) * bits
    word, offset = bit_pos // 32, bit_pos % 32
    mask = (1 << bits) - 1
    out = (w[..., word] >> offset) & mask
    spill = offset + bits > 32
    if bool(spill.any()):
        idx = spill.nonzero().flatten()
        hi = w[..., word[idx] + 1] << (32 - offset[idx])
        out[..., idx] = (out[..., idx] | hi) & mask
    return out.movedim(-1, dim)
