"""The GGUF (llama.cpp) block layouts: the byte-level spec of every block type.

``dequantize_blocks`` returns, bit for bit, the fp32 values that gguf-py's
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

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from ..errors import FormatError, ShapeError



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
LEGACY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
QK_K = 256
# Sub-blocks per k-quant super-block (the length of its scales/mins fields).
K_SUB_BLOCKS = {"Q2_K": 16, "Q3_K": 16, "Q4_K": 8, "Q5_K": 8, "Q6_K": 16}

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


def pack_k4_scales(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Inverse of ``k4_scale_min``: (nb, 8) six-bit scales and mins -> (nb, 12) bytes.

    Exactly the stores of llama.cpp's quantizer, including its quirk: bits above
    the six a value should have are not masked (only the importance-weighted
    Q4_K quantizer produces such values), so they spill into neighbouring bits
    as in C; values in [0, 63] round-trip through ``k4_scale_min``.
    """
    s, m = scales.to(torch.int32), mins.to(torch.int32)
    lo_s = (s[:, :4] | ((s[:, 4:] >> 4) << 6)) & 0xFF
    lo_m = (m[:, :4] | ((m[:, 4:] >> 4) << 6)) & 0xFF
    hi = ((s[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)) & 0xFF
    return torch.cat([lo_s, lo_m, hi], dim=1)


def q3_scale_values(sc: torch.Tensor) -> torch.Tensor:
    """The 16 signed scales (six-bit - 32) of Q3_K from its 12 scale bytes (nb, 12)."""
    nb = sc.shape[0]
    low = torch.cat([sc[:, 0:8] & 0xF, sc[:, 0:8] >> 4], dim=1)
    high = ((sc[:, 8:12].view(nb, 1, 4) >> _shifts([0, 2, 4, 6], sc.device, (1, 4, 1))) & 3).reshape(nb, 16)
    return (low | (high << 4)) - 32


def pack_q3_scales(l6: torch.Tensor) -> torch.Tensor:
    """Inverse of ``q3_scale_values`` (before the -32): (nb, 16) six-bit values -> (nb, 12) bytes."""
    l6 = l6.to(torch.int32)
    low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    high = ((l6.view(-1, 4, 4) >> 4) << _shifts([0, 2, 4, 6], l6.device, (1, 4, 1))).sum(1, dtype=torch.int32)
    return torch.cat([low, high], dim=1)


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


# --- k-quants: fields <-> bytes ------------------------------------------------
# A k-quant super-block holds 256 codes, its fp16 ``d`` (and ``dmin``) and one
# integer scale (and min) per sub-block, each field as stored:
#   Q2_K  scales, mins (16,) 0..15; codes 0..3;         w = (d*sc)*q - dmin*mn
#   Q3_K  scales (16,) six-bit (value + 32); codes 0..7 (value + 4)
#   Q4_K  scales, mins (8,) six-bit; codes 0..15        (Q5_K: codes 0..31)
#   Q6_K  scales (16,) int8; codes 0..63 (value + 32)
# Sub-block of code i: i // 16 (Q2_K, Q3_K, Q6_K) or i // 32 (Q4_K, Q5_K).
def _pack_2bit(q: torch.Tensor) -> torch.Tensor:
    """(B, 256) 2-bit codes -> (B, 64): byte 32h+l = sum_k q[128h + 32k + l] << 2k."""
    sh = _shifts([0, 2, 4, 6], q.device, (1, 1, 4, 1))
    return ((q.view(q.shape[0], 2, 4, 32) & 3) << sh).sum(2, dtype=torch.int32).view(-1, 64)


def _bit_planes(bits: torch.Tensor) -> torch.Tensor:
    """(B, 256) bits -> (B, 32): byte l bit i = bits[32i + l]."""
    sh = _shifts(list(range(8)), bits.device, (1, 8, 1))
    return ((bits.view(bits.shape[0], 8, 32) & 1) << sh).sum(1, dtype=torch.int32)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_pack_2bit``: (B, 64) bytes -> (B, 256) codes."""
    return ((qs.view(-1, 2, 1, 32) >> _shifts([0, 2, 4, 6], qs.device, (1, 1, 4, 1))) & 3).reshape(-1, 256)


def _unpack_bit_planes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_bit_planes``: (B, 32) bytes -> (B, 256) bits."""
    return ((planes.view(-1, 1, 32) >> _shifts(list(range(8)), planes.device, (1, 8, 1))) & 1).reshape(-1, 256)


def _low_nibbles_k4(qs: torch.Tensor) -> torch.Tensor:
    """(B, 128) bytes -> (B, 256) low four bits of Q4_K/Q5_K codes: q[64c + 32t + l] = qs[32c + l] >> 4t."""
    return ((qs.view(-1, 4, 1, 32) >> _shifts([0, 4], qs.device, (1, 1, 2, 1))) & 0xF).reshape(-1, 256)


def pack_k_blocks(type_name: str, d, dmin, scales, mins, codes) -> torch.Tensor:
    """The bit-layout spec of the k-quants: fields (see above; ``B`` super-blocks)
    -> raw block bytes uint8 ``(B, type_size)``. ``d``/``dmin`` ``(B,)`` are cast
    to fp16 (round to nearest even); ``dmin``/``mins`` are None for Q3_K/Q6_K.
    Values are stored as llama.cpp's C stores do: a scale or min wider than its
    field spills into its neighbours' bits (``pack_k4_scales``), codes are masked."""
    if type_name not in K_TYPES:
        raise FormatError(f"pack_k_blocks handles {list(K_TYPES)}, got {type_name!r}")
    has_min = type_name in ("Q2_K", "Q4_K", "Q5_K")
    if has_min != (dmin is not None) or has_min != (mins is not None):
        raise FormatError(f"{type_name} {'needs' if has_min else 'has no'} dmin and mins")
    codes = codes.to(torch.int32)
    b = codes.shape[0]
    if tuple(codes.shape) != (b, QK_K) or tuple(scales.shape) != (b, K_SUB_BLOCKS[type_name]):
        raise ShapeError(
            f"{type_name} fields for {b} super-blocks: codes must be {(b, QK_K)} and scales "
            f"{(b, K_SUB_BLOCKS[type_name])}, got {tuple(codes.shape)} and {tuple(scales.shape)}"
        )
    scales = scales.to(torch.int32)
    d16 = f16_bytes(d.reshape(b))
    if type_name == "Q2_K":
        sc = (scales | (mins.to(torch.int32) << 4)) & 0xFF
        parts = [sc, _pack_2bit(codes), d16, f16_bytes(dmin.reshape(b))]
    elif type_name == "Q3_K":
        parts = [_bit_planes(codes >> 2), _pack_2bit(codes), pack_q3_scales(scales), d16]
    elif type_name == "Q6_K":
        qv = codes.view(b, 2, 4, 32)
        lo = qv & 0xF
        ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2).reshape(b, 128)
        qh = (((qv >> 4) & 3) << _shifts([0, 2, 4, 6], codes.device, (1, 1, 4, 1))).sum(2, dtype=torch.int32)
        parts = [ql, qh.reshape(b, 64), scales & 0xFF, d16]
    else:
        qv = codes.view(b, 4, 2, 32) & 0xF
        qs = (qv[:, :, 0] | (qv[:, :, 1] << 4)).reshape(b, 128)
        parts = [d16, f16_bytes(dmin.reshape(b)), pack_k4_scales(scales, mins)]
        if type_name == "Q5_K":
            parts.append(_bit_planes(codes >> 4))
        parts.append(qs)
    return torch.cat([p.reshape(b, -1).to(torch.int32) for p in parts], dim=1).to(torch.uint8)


def unpack_k_blocks(type_name: str, blocks: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
    """Raw k-quant blocks ``(B, type_size)`` -> the fields ``pack_k_blocks``
    takes: ``d``/``dmin`` fp16 ``(B,)``, ``scales``/``mins`` and ``codes`` int32
    (``dmin``/``mins`` None for Q3_K/Q6_K)."""
    if type_name not in K_TYPES:
        raise FormatError(f"unpack_k_blocks handles {list(K_TYPES)}, got {type_name!r}")
    b = blocks.to(torch.int32)
    out: Dict[str, Optional[torch.Tensor]] = {"dmin": None, "mins": None}
    if type_name == "Q2_K":
        out.update(d=f16_field(b, 80), dmin=f16_field(b, 82), scales=b[:, 0:16] & 0xF, mins=b[:, 0:16] >> 4,
                   codes=_unpack_2bit(b[:, 16:80]))
    elif type_name == "Q3_K":
        codes = _unpack_2bit(b[:, 32:96]) | (_unpack_bit_planes(b[:, 0:32]) << 2)
        out.update(d=f16_field(b, 108), scales=q3_scale_values(b[:, 96:108]) + 32, codes=codes)
    elif type_name == "Q6_K":
        nb = b.shape[0]
        lo = ((b[:, 0:128].view(nb, 2, 1, 64) >> _shifts([0, 4], b.device, (1, 1, 2, 1))) & 0xF).reshape(nb, 256)
        hi = ((b[:, 128:192].view(nb, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device, (1, 1, 4, 1))) & 3).reshape(nb, 256)
        sc = b[:, 192:208]
        out.update(d=f16_field(b, 208), scales=torch.where(sc >= 128, sc - 256, sc), codes=lo | (hi << 4))
    else:
        sc, mn = k4_scale_min(b[:, 4:16])
        codes = _low_nibbles_k4(b[:, -128:])
        if type_name == "Q5_K":
            codes = codes | (_unpack_bit_planes(b[:, 16:48]) << 4)
        out.update(d=f16_field(b, 0), dmin=f16_field(b, 2), scales=sc, mins=mn, codes=codes)
    return out


# --- decoders: (nb, type_size) int32 -> (nb, block_size) fp32 ------------------
def _deq_legacy(type_name: str, b: torch.Tensor) -> torch.Tensor:
    has_min, _, offset = _LEGACY[type_name]
    d, m, q = unpack_legacy_blocks(type_name, b)
    d = d.to(torch.float32).unsqueeze(1)
    q = (q - offset).to(torch.float32)
    if has_min:
        return d * q + m.to(torch.float32).unsqueeze(1)
    return d * q


def _deq_k(type_name: str, b: torch.Tensor) -> torch.Tensor:
    """Every k-quant decodes as ``(d*sc)*q [- dmin*mn]`` per sub-block, each product
    rounded to fp32 on its own (llama.cpp's order), with q the signed code value."""
    f = unpack_k_blocks(type_name, b)
    nb, nsub = f["scales"].shape
    sc = f["scales"]
    q = f["codes"]
    if type_name == "Q3_K":
        sc, q = sc - 32, q - 4
    elif type_name == "Q6_K":
        q = q - 32
    dl = (f["d"].to(torch.float32).unsqueeze(1) * sc.to(torch.float32)).unsqueeze(2)
    w = dl * q.view(nb, nsub, -1).to(torch.float32)
    if f["dmin"] is not None:
        w = w - (f["dmin"].to(torch.float32).unsqueeze(1) * f["mins"].to(torch.float32)).unsqueeze(2)
    return w.reshape(nb, QK_K)


def dequantize_blocks(type_name: str, blocks: torch.Tensor) -> torch.Tensor:
    """Raw blocks uint8 ``(nb, type_size)`` -> fp32 ``(nb, block_size)``."""
    b = blocks.to(torch.int32)
    if type_name in _LEGACY:
        return _deq_legacy(type_name, b)
    if type_name in K_TYPES:
        return _deq_k(type_name, b)
    raise FormatError(f"no reference decoder for GGUF type {type_name!r}")
