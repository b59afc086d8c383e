"""Pure-torch specification of the GGUF (llama.cpp) block formats.

``gguf_dequantize`` returns, bit for bit, the fp32 values that gguf-py's
``gguf.quants.dequantize`` (and llama.cpp's ``dequantize_row_*``) produce for
the same block bytes. Bit-exactness depends on doing the same fp32 operations
in the same order, so each decoder below spells that order out, e.g. Q4_1 is
``(d * q) + m`` (two roundings, never a fused multiply-add) and the k-quants
first form the per-sub-block scale ``d * sc`` in fp32 and only then multiply
by the code. Every value is decoded from the bytes with integer ops (explicit
little-endian), so the code is independent of the host byte order and runs on
any device, vectorised over all blocks at once.

Block layouts (offsets in bytes, ``f16`` = IEEE half, little-endian)::

    Q4_0  18 B: d f16 | qs[16]                 w[j] = d*(q-8)
    Q4_1  20 B: d f16 | m f16 | qs[16]         w[j] = d*q + m
    Q5_0  22 B: d f16 | qh[4] | qs[16]         w[j] = d*(q-16)
    Q5_1  24 B: d f16 | m f16 | qh[4] | qs[16] w[j] = d*q + m
    Q8_0  34 B: d f16 | qs[32] int8            w[j] = q*d
      legacy nibbles: q[j] = qs[j] & 15, q[j+16] = qs[j] >> 4 (j < 16);
      Q5 fifth bit of q[j] = bit j of qh read as a little-endian u32.

    Q2_K  84 B: scales[16] | qs[64] | d f16 | dmin f16
      16 sub-blocks of 16; scales[s] = sc | mn<<4 (4 bits each);
      q[128h + 32i + l] = (qs[32h + l] >> 2i) & 3;  w = (d*sc)*q - dmin*mn
    Q3_K 110 B: hmask[32] | qs[64] | scales[12] | d f16
      low two bits as Q2_K; third bit of q[32i + l] = (hmask[l] >> i) & 1 and
      q -= 4 when that bit is 0; 16 six-bit scales, low nibbles in bytes 0..7
      (s < 8: byte s & 15, s >= 8: byte s-8 >> 4), top two bits of scale s in
      byte 8 + s%4 at bit 2*(s//4); scale value = six-bit - 32;  w = (d*sc)*q
    Q4_K 144 B: d f16 | dmin f16 | scales[12] | qs[128]
      8 sub-blocks of 32; q[64c + 32t + l] = (qs[32c + l] >> 4t) & 15;
      six-bit sc/mn as in ``k4_scale_min``;  w = (d*sc)*q - dmin*mn
    Q5_K 176 B: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
      as Q4_K plus the fifth bit of q[32i + l] = (qh[l] >> i) & 1
    Q6_K 210 B: ql[128] | qh[64] | scales[16] int8 | d f16
      q[128h + 64t + l] low nibble = (ql[64h + l] >> 4t) & 15  (l < 64),
      q[128h + 32i + l] top 2 bits = (qh[32h + l] >> 2i) & 3   (l < 32);
      q -= 32;  w = (d*sc)*q with sc = scales[idx // 16]
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..errors import DtypeError, FormatError, ShapeError
from ..formats.gguf import BLOCK_TYPES, GGUF

LEGACY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# Byte offsets of the fp16 fields of each block (scales, mins).
FP16_FIELDS: Dict[str, Tuple[int, ...]] = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}

# Legacy types: (has min, bits per code, code offset of the symmetric types).
_LEGACY = {
    "Q4_0": (False, 4, 8),
    "Q4_1": (True, 4, 0),
    "Q5_0": (False, 5, 16),
    "Q5_1": (True, 5, 0),
    "Q8_0": (False, 8, 0),
}


# --- byte helpers -------------------------------------------------------------
def _shifts(values, device, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device).view(shape)


def f16_field(b: torch.Tensor, off: int) -> torch.Tensor:
    """The fp16 stored little-endian at byte ``off`` of each block row of ``b``
    (int32 bytes ``(nb, type_size)``), as an fp16 tensor ``(nb,)``."""
    bits = b[:, off] | (b[:, off + 1] << 8)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits)
    return bits.to(torch.int16).view(torch.float16)


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16 tensor ``(...)`` -> its little-endian bytes as int32 ``(..., 2)``."""
    bits = x.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.stack([bits & 0xFF, bits >> 8], dim=-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(nb, 16) bytes -> (nb, 32) legacy codes: low nibbles first, then high."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


def _bits_le(qh: torch.Tensor) -> torch.Tensor:
    """(nb, nbytes) -> (nb, nbytes*8) bits, bit j = byte j//8, bit j%8."""
    sh = _shifts(list(range(8)), qh.device, (1, 1, 8))
    return ((qh.unsqueeze(-1) >> sh) & 1).reshape(qh.shape[0], -1)


def k4_scale_min(sc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit (scale, min) pairs of Q4_K/Q5_K from their 12 bytes.

    Bytes 0..3 hold scale j (j < 4) in bits 0..5, bytes 4..7 min j likewise;
    for j >= 4 the low four bits come from byte 8 + j-4 (scale: low nibble,
    min: high nibble) and the top two bits from bits 6..7 of byte j-4 (scale)
    or byte j (min).
    """
    lo_s, lo_m, hi = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = torch.cat([lo_s & 0x3F, (hi & 0xF) | ((lo_s >> 2) & 0x30)], dim=1)
    mins = torch.cat([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 2) & 0x30)], dim=1)
    return scale, mins


def k4_pack_scale_min(scale: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Inverse of ``k4_scale_min``: (nb, 8) six-bit values each -> (nb, 12) bytes."""
    s, m = scale.to(torch.int32), mins.to(torch.int32)
    lo_s = (s[:, :4] & 0x3F) | ((s[:, 4:] >> 4) << 6)
    lo_m = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    hi = (s[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([lo_s, lo_m, hi], dim=1)


# --- legacy types: unpack / pack ----------------------------------------------
def unpack_legacy_blocks(type_name: str, blocks: torch.Tensor):
    """Raw legacy blocks ``(nb, type_size)`` uint8 -> ``(d, m, codes)``.

    ``d``, ``m``: fp16 ``(nb,)`` (``m`` is None for the types without a min);
    ``codes``: int32 ``(nb, 32)``, the stored integer: unsigned for Q4/Q5
    (0..15 / 0..31; Q4_0/Q5_0 mean ``code - 8`` / ``code - 16``) and signed
    -128..127 for Q8_0.
    """
    has_min, bits, _ = _LEGACY[type_name]
    b = blocks.to(torch.int32)
    d = f16_field(b, 0)
    off = 2
    m = None
    if has_min:
        m = f16_field(b, 2)
        off = 4
    if bits == 8:
        q = b[:, off : off + 32]
        return d, m, torch.where(q >= 128, q - 256, q)
    if bits == 5:
        high = _bits_le(b[:, off : off + 4])
        off += 4
        return d, m, _nibbles(b[:, off : off + 16]) | (high << 4)
    return d, m, _nibbles(b[:, off : off + 16])


def pack_legacy_blocks(
    type_name: str, d: torch.Tensor, m: Optional[torch.Tensor], codes: torch.Tensor
) -> torch.Tensor:
    """The bit-layout spec of the legacy types: fields -> raw block bytes.

    ``d`` (and ``m`` for Q4_1/Q5_1, else None): ``(N, nb)``, cast to fp16 with
    round-to-nearest-even; ``codes``: integer ``(N, nb*32)`` holding the stored
    integer (see ``unpack_legacy_blocks``; Q8_0 takes signed values, the rest
    unsigned, and values are taken modulo 2**bits). Returns uint8
    ``(N, nb*type_size)``.
    """
    if type_name not in _LEGACY:
        raise FormatError(f"pack_legacy_blocks handles {list(_LEGACY)}, got {type_name!r}")
    has_min, bits, _ = _LEGACY[type_name]
    if has_min != (m is not None):
        raise FormatError(f"{type_name} {'needs' if has_min else 'has no'} min tensor m")
    if codes.dim() != 2 or codes.shape[1] % 32:
        raise ShapeError(f"codes must be (N, nb*32), got {tuple(codes.shape)}")
    n, k = codes.shape
    nb = k // 32
    if tuple(d.shape) != (n, nb) or (m is not None and tuple(m.shape) != (n, nb)):
        raise ShapeError(
            f"d{' and m' if has_min else ''} must be {(n, nb)} for codes {tuple(codes.shape)}, got "
            f"{tuple(d.shape)}{'' if m is None else ' and ' + str(tuple(m.shape))}"
        )
    q = codes.reshape(n * nb, 32).to(torch.int32) & ((1 << bits) - 1)
    parts = [f16_bytes(d.reshape(-1))]
    if has_min:
        parts.append(f16_bytes(m.reshape(-1)))
    if bits == 8:
        parts.append(q)
    else:
        if bits == 5:
            sh = _shifts(list(range(8)), q.device, (1, 1, 8))
            parts.append((((q >> 4) & 1).view(-1, 4, 8) << sh).sum(-1))
        q = q & 0xF
        parts.append(q[:, :16] | (q[:, 16:] << 4))
    out = torch.cat([p.reshape(n * nb, -1) for p in parts], dim=1).to(torch.uint8)
    return out.view(n, nb * BLOCK_TYPES[type_name].type_size)


# --- decoders: (nb, type_size) int32 -> (nb, block_size) fp32 ------------------
def _deq_legacy(type_name: str, b: torch.Tensor) -> torch.Tensor:
    has_min, _, offset = _LEGACY[type_name]
    d, m, q = unpack_legacy_blocks(type_name, b)
    d = d.to(torch.float32).unsqueeze(1)
    q = (q - offset).to(torch.float32)
    if has_min:
        return d * q + m.to(torch.float32).unsqueeze(1)
    return d * q


def _deq_q2_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    sc = b[:, 0:16]
    d = f16_field(b, 80).to(torch.float32).unsqueeze(1)
    dmin = f16_field(b, 82).to(torch.float32).unsqueeze(1)
    dl = d * (sc & 0xF).to(torch.float32)
    ml = dmin * (sc >> 4).to(torch.float32)
    sh = _shifts([0, 2, 4, 6], b.device, (1, 1, 4, 1))
    q = (b[:, 16:80].view(nb, 2, 1, 32) >> sh) & 3
    q = q.reshape(nb, 16, 16).to(torch.float32)
    return (dl.unsqueeze(2) * q - ml.unsqueeze(2)).reshape(nb, 256)


def _deq_q3_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    hmask, qs, sc = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    d = f16_field(b, 108).to(torch.float32).unsqueeze(1)
    sh4 = _shifts([0, 2, 4, 6], b.device, (1, 4, 1))
    low = torch.cat([sc[:, 0:8] & 0xF, sc[:, 0:8] >> 4], dim=1)
    high = ((sc[:, 8:12].view(nb, 1, 4) >> sh4) & 3).reshape(nb, 16)
    scale = (low | (high << 4)) - 32
    dl = (d * scale.to(torch.float32)).unsqueeze(2)
    ql = (qs.view(nb, 2, 1, 32) >> sh4.view(1, 1, 4, 1)) & 3
    hbit = (hmask.view(nb, 1, 32) >> _shifts(list(range(8)), b.device, (1, 8, 1))) & 1
    # A set hmask bit means "no -4": the format stores the complement.
    q = ql.reshape(nb, 256) - ((1 - hbit.reshape(nb, 256)) << 2)
    return (dl * q.view(nb, 16, 16).to(torch.float32)).reshape(nb, 256)


def _deq_q45_k(b: torch.Tensor, five: bool) -> torch.Tensor:
    nb = b.shape[0]
    d = f16_field(b, 0).to(torch.float32).unsqueeze(1)
    dmin = f16_field(b, 2).to(torch.float32).unsqueeze(1)
    sc, mn = k4_scale_min(b[:, 4:16])
    dd = (d * sc.to(torch.float32)).unsqueeze(2)
    dm = (dmin * mn.to(torch.float32)).unsqueeze(2)
    off = 16
    if five:
        qh = b[:, 16:48]
        off = 48
    qs = b[:, off : off + 128]
    q = ((qs.view(nb, 4, 1, 32) >> _shifts([0, 4], b.device, (1, 1, 2, 1))) & 0xF).reshape(nb, 8, 32)
    if five:
        hbit = (qh.view(nb, 1, 32) >> _shifts(list(range(8)), b.device, (1, 8, 1))) & 1
        q = q | (hbit << 4)
    return (dd * q.to(torch.float32) - dm).reshape(nb, 256)


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    ql, qh, sc = b[:, 0:128], b[:, 128:192], b[:, 192:208]
    d = f16_field(b, 208).to(torch.float32).unsqueeze(1)
    sc = torch.where(sc >= 128, sc - 256, sc)
    dl = (d * sc.to(torch.float32)).unsqueeze(2)
    lo = ((ql.view(nb, 2, 1, 64) >> _shifts([0, 4], b.device, (1, 1, 2, 1))) & 0xF).reshape(nb, 256)
    hi = ((qh.view(nb, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device, (1, 1, 4, 1))) & 3).reshape(nb, 256)
    q = (lo | (hi << 4)) - 32
    return (dl * q.view(nb, 16, 16).to(torch.float32)).reshape(nb, 256)


def dequantize_blocks(type_name: str, blocks: torch.Tensor) -> torch.Tensor:
    """Raw blocks uint8 ``(nb, type_size)`` -> fp32 ``(nb, block_size)``."""
    b = blocks.to(torch.int32)
    if type_name in _LEGACY:
        return _deq_legacy(type_name, b)
    if type_name == "Q2_K":
        return _deq_q2_k(b)
    if type_name == "Q3_K":
        return _deq_q3_k(b)
    if type_name in ("Q4_K", "Q5_K"):
        return _deq_q45_k(b, type_name == "Q5_K")
    if type_name == "Q6_K":
        return _deq_q6_k(b)
    raise FormatError(f"no reference decoder for GGUF type {type_name!r}")


def gguf_dequantize(fmt: GGUF, tensors: dict, shape) -> torch.Tensor:
    """The fp32 weight ``(N, K)`` held by ``tensors["blocks"]`` (raw GGUF blocks)."""
    n, k = int(shape[0]), int(shape[1])
    fmt.check_shape((n, k))
    bt = fmt.block
    blocks = tensors["blocks"]
    if blocks.dtype != torch.uint8:
        raise DtypeError(f"GGUF {fmt.type} blocks must be uint8, got {blocks.dtype}")
    want = (n, k // bt.block_size * bt.type_size)
    if tuple(blocks.shape) != want:
        raise ShapeError(f"GGUF {fmt.type} blocks for weight shape {(n, k)} must be {want}, got {tuple(blocks.shape)}")
    nb = n * (k // bt.block_size)
    out = dequantize_blocks(fmt.type, blocks.reshape(nb, bt.type_size))
    return out.reshape(n, k)
