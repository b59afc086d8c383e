"""Pure-torch specification of NF4 (bitsandbytes' QLoRA format).

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

import functools
from typing import Dict

import torch

from ..errors import DtypeError, ShapeError, ValueRangeError
from ..formats.nf4 import NESTED_BLOCK_SIZE, NF4, NF4_CODEBOOK

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


def nf4_decode_absmax(fmt: NF4, t: Dict[str, torch.Tensor], nblocks: int) -> torch.Tensor:
    """The fp32 per-block absmax ``(nblocks,)``, decoding double quantization if used."""
    if not fmt.double_quant:
        return t["absmax"].to(torch.float32)
    q = t["absmax_q"].long()
    scale = t["absmax_scale"].to(torch.float32).repeat_interleave(NESTED_BLOCK_SIZE)[:nblocks]
    # Two rounded fp32 operations, in this order (see the module docstring).
    prod = dynamic_map(q.device)[q] * scale
    return prod + t["absmax_offset"].to(torch.float32)


def nf4_dequantize(fmt: NF4, t: Dict[str, torch.Tensor], shape) -> torch.Tensor:
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
