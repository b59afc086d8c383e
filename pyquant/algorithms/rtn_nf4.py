"""Round-to-nearest NF4, byte-identical to ``bitsandbytes.functional.quantize_4bit``.

What bitsandbytes (0.45 - 0.50, CPU) decides, and this module reproduces:

* The weight is converted to fp32 first (``A.float()``), so fp16 and bf16
  weights give the same bytes as their exact fp32 values: we do the same.
* Flat row-major blocks of ``block_size``; ``absmax`` = max |w| of the block.
* Full blocks scale by a reciprocal, ``w * (1 / max(absmax, 1e-38))``; the
  ragged last block divides, ``w / max(absmax, 1e-38)``, and *stores* the
  clamped absmax (an all-zero tail stores 1e-38, an all-zero full block 0).
  Both are clamped to [-1, 1]. The two roundings differ in the last ulp, which
  decides codes that land on a boundary, so we keep both.
* Code = number of fp32 midpoints ``(c[j] + c[j+1]) / 2`` strictly below the
  scaled value: a value exactly on a midpoint takes the lower code.
* Double quantization ("compress_statistics"): ``offset = mean(absmax)``, then
  ``absmax - offset`` goes through bitsandbytes' CPU 8-bit blockwise quantizer
  with the signed dynamic map and blocks of 256. That quantizer is not a plain
  nearest search: it maps ``v = x * (1 / blockmax)`` (clamped to [-1, 1]) to one
  of 65536 bins, ``trunc(fma((v + 1) / 2, 65535, 0.5))``, and each bin to the map
  entry whose midpoint interval holds the bin's left value
  ``-1 + 2 * bin / 65535``. Entries finer than a bin (the map's tiny values near
  0) are therefore unreachable, and ties follow the bin grid, not the map.
  An all-zero block of 256 stores scale 0 and codes 0.
"""
from __future__ import annotations

import functools
import math

import torch

from ..errors import ValueRangeError
from ..formats.base import QuantizedWeight
from ..formats.nf4 import NESTED_BLOCK_SIZE, NF4
from ..formats.nf4 import dynamic_map, nf4_codebook

# bitsandbytes clamps block maxima to this before taking reciprocals.
_ABSMAX_FLOOR = 1e-38
# Bins of the 8-bit quantizer's lookup table over [-1, 1].
_LUT_BINS = 65536


def nf4_quantize_blocks(w_flat: torch.Tensor, block_size: int):
    """NF4 codes uint8 ``(numel,)`` and fp32 absmax ``(nblocks,)`` of a flat fp32 tensor."""
    a = w_flat.reshape(-1).to(torch.float32)
    n = a.numel()
    rem = n % block_size
    full = n - rem
    cb = nf4_codebook(a.device)
    mids = (cb[:-1] + cb[1:]) / 2
    parts, absmax_parts = [], []
    if full:
        blocks = a[:full].view(-1, block_size)
        am = blocks.abs().amax(dim=1)
        inv = torch.reciprocal(am.clamp(min=_ABSMAX_FLOOR))
        parts.append((blocks * inv[:, None]).clamp(-1.0, 1.0).reshape(-1))
        absmax_parts.append(am)
    if rem:
        tail = a[full:]
        am_t = tail.abs().amax().clamp(min=_ABSMAX_FLOOR)
        parts.append((tail / am_t).clamp(-1.0, 1.0))
        absmax_parts.append(am_t.reshape(1))
    scaled = torch.cat(parts)
    codes = torch.searchsorted(mids, scaled, side="left").to(torch.uint8)
    return codes, torch.cat(absmax_parts)


@functools.lru_cache(maxsize=None)
def _dynamic_lut_cpu() -> torch.Tensor:
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(_LUT_BINS, dtype=torch.float32)
    # Left value of each bin, rounded as fp32 (true division, then the add).
    left = (2.0 * i) / torch.full_like(i, float(_LUT_BINS - 1)) + -1.0
    return torch.searchsorted(mids, left, side="left").to(torch.uint8)


def quantize_absmax_nested(absmax: torch.Tensor):
    """Double quantization of fp32 block maxima: ``(absmax_q, absmax_scale, absmax_offset)``."""
    absmax = absmax.to(torch.float32)
    nb = absmax.numel()
    offset = absmax.mean()
    centred = absmax - offset
    nb2 = math.ceil(nb / NESTED_BLOCK_SIZE)
    padded = centred.new_zeros(nb2 * NESTED_BLOCK_SIZE)
    padded[:nb] = centred
    blocks = padded.view(nb2, NESTED_BLOCK_SIZE)
    scale = blocks.abs().amax(dim=1)
    # A zero block would give 0 * inf = NaN; its codes are forced to 0 below.
    inv = torch.where(scale > 0, torch.reciprocal(scale), torch.zeros_like(scale))
    v = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    half = (v + 1.0) * 0.5
    # fma(half, 65535, 0.5) rounded once to fp32: exact in fp64, because
    # v + 1 is a multiple of 2**-24 below 2, so the exact result needs < 42 bits.
    bins = (half.double() * float(_LUT_BINS - 1) + 0.5).to(torch.float32).trunc().long()
    q = _dynamic_lut_cpu().to(absmax.device)[bins]
    q = torch.where((scale == 0)[:, None], torch.zeros_like(q), q)
    return q.reshape(-1)[:nb].contiguous(), scale, offset.reshape(1)


def rtn_nf4(w: torch.Tensor, fmt: NF4) -> QuantizedWeight:
    """Quantize ``w`` ``(N, K)`` (any float dtype; converted to fp32 like bitsandbytes)."""
    w = w.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueRangeError(
            f"weight contains NaN or Inf (first at index {tuple(bad)}, value {w[tuple(bad)].item()}); "
            "NF4 cannot encode it"
        )
    codes, absmax = nf4_quantize_blocks(w.reshape(-1), fmt.block_size)
    codes = codes.view(w.shape)
    if fmt.double_quant:
        q, scale, offset = quantize_absmax_nested(absmax)
        return fmt.pack(codes, absmax_q=q, absmax_scale=scale, absmax_offset=offset)
    return fmt.pack(codes, absmax)
