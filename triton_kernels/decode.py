"""In-register decode of every format: the only Triton code that knows bit layouts.

Two kinds of decoder, one per way the kernels read weights:

* Element-wise (``w_tile``, every format; the dequantize kernel and the generic
  GEMV / tensor-core kernels). Each takes broadcastable index tensors ``nn``
  (output row, int64) and ``kk`` (input column in *stored* order, already
  clamped in range) and returns the fp32 weight of every (n, k) pair. The same
  function serves ``[BN, BK]`` tiles (dequantize, GEMV) and ``[BK, BN]`` tiles
  (tensor cores): only the broadcast orientation of ``nn``/``kk`` changes.
  Every byte is gathered with its own address computed from (n, k): duplicates
  (the two nibbles of one byte, the scale shared by a group) hit L1, so DRAM
  traffic equals the packed size while the code stays one formula per format.

* Word-wise (``code_magic``, ``nf4_level``, ``codes_tile``; the Int4 / Int8 /
  NF4 kernels of ``matmul/gemv_packed.py`` and ``matmul/mm_packed.py``). Codes
  are taken out of 32-bit words already in registers: a shift and a mask that
  land the code in a float's mantissa, no int -> float conversion.

The fp32 operations are the reference's, in its order (``pyquant/ops/
reference.py``, ``pyquant/formats/nf4.py``, ``reference_gguf.py``). Kernels
that must be bit-exact are launched with ``enable_fp_fusion=False`` so that
``a * b + c`` is not contracted into an FMA (one rounding instead of two).
"""
import triton
import triton.language as tl

# Format families (the FMT constexpr).
FMT_INT = 1
FMT_NF4 = 2
FMT_GGUF = 3


# --- element-wise: one gathered byte per weight ----------------------------------
@triton.jit
def _u8(p, off):
    return tl.load(p + off).to(tl.int32)


@triton.jit
def _f16(p, off):
    # fp16 stored little-endian at byte offset ``off``: assembled from two byte
    # loads so that no alignment of the block buffer is assumed.
    bits = _u8(p, off) | (_u8(p, off + 1) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _s8(v):
    return tl.where(v >= 128, v - 256, v)


@triton.jit
def _int_tile(qw, sc, zr, nn, kk, k0, row_bytes, ng, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
              GSHIFT: tl.constexpr, UNIFORM: tl.constexpr):
    row = nn * row_bytes
    chunk = kk >> 5
    j = kk & 31
    if BITS == 8:
        q = _u8(qw, row + kk)
    elif BITS == 4:
        # byte j of a chunk = c[j] | c[j+16] << 4
        q = (_u8(qw, row + chunk * 16 + (j & 15)) >> ((j >> 4) * 4)) & 15
    elif BITS == 2:
        # byte j of a chunk = c[j] | c[j+8] << 2 | c[j+16] << 4 | c[j+24] << 6
        q = (_u8(qw, row + chunk * 8 + (j & 7)) >> ((j >> 3) * 2)) & 3
    else:
        # 3 bits: the 2-bit plane in bytes 0..7, bit 2 of c[j] is bit j of the
        # little-endian uint32 in bytes 8..11
        base = row + chunk * 12
        lo = (_u8(qw, base + (j & 7)) >> ((j >> 3) * 2)) & 3
        hi = (_u8(qw, base + 8 + (j >> 3)) >> (j & 7)) & 1
        q = lo | (hi << 2)
    # group sizes are powers of two (a shift, not a division); GSHIFT 0 means
    # per channel: one group per row. UNIFORM: the K tile lies inside one group
    # (BK divides the group size), so scales/zeros are one load per row
    # instead of one gather per weight.
    if GSHIFT == 0:
        gidx = nn * ng
    elif UNIFORM:
        gidx = nn * ng + (k0 >> GSHIFT)
    else:
        gidx = nn * ng + (kk >> GSHIFT)
    s = tl.load(sc + gidx).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(zr + gidx).to(tl.float32)
    else:
        z = 1 << (BITS - 1)
    return (q.to(tl.float32) - z) * s


@triton.jit
def nf4_dq_absmax(am_q, am_scale, am_off, dmap, blk):
    """fp32 absmax of NF4 block ``blk`` decoded from the double-quantized statistics:
    ``am_q`` uint8 codes into the signed dynamic map ``dmap``, one fp32 ``am_scale``
    per 256 blocks, one fp32 offset ``am_off``."""
    # two separately rounded fp32 ops, as bitsandbytes' two passes
    a = tl.load(dmap + tl.load(am_q + blk).to(tl.int32)) * tl.load(am_scale + (blk >> 8))
    return a + tl.load(am_off)


@triton.jit
def _nf4_tile(qw, am, am_scale, am_off, cb, dmap, nn, kk, k0, K, BS: tl.constexpr, DQ: tl.constexpr,
              UNIFORM: tl.constexpr):
    # bitsandbytes flattens the weight: blocks and bytes ignore row boundaries
    i = nn * K + kk
    b = tl.load(qw + (i >> 1)).to(tl.int32)
    code = tl.where((i & 1) == 0, b >> 4, b & 15)  # first value in the high nibble
    v = tl.load(cb + code)
    if UNIFORM:
        # rows are whole blocks and the K tile lies in one block: one absmax per row
        blk = (nn * K + k0) // BS
    else:
        blk = i // BS
    if DQ:
        a = nf4_dq_absmax(am, am_scale, am_off, dmap, blk)
    else:
        a = tl.load(am + blk)
    return v * a


@triton.jit
def _k4_scale_min(p, sbase, j):
    # Q4_K/Q5_K six-bit (scale, min) of sub-block j from the 12 scale bytes
    jj = j & 3
    a = _u8(p, sbase + jj)
    b = _u8(p, sbase + jj + 4)
    c = _u8(p, sbase + jj + 8)
    sc = tl.where(j < 4, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(j < 4, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc, mn


@triton.jit
def _gguf_tile(pb, nn, kk, row_bytes, QT: tl.constexpr):
    row = nn * row_bytes
    if QT == 2:  # Q4_0: d | qs[16]
        base = row + (kk >> 5) * 18
        w = kk & 31
        q = (_u8(pb, base + 2 + (w & 15)) >> ((w >> 4) * 4)) & 15
        out = _f16(pb, base) * (q - 8).to(tl.float32)
    elif QT == 3:  # Q4_1: d | m | qs[16]
        base = row + (kk >> 5) * 20
        w = kk & 31
        q = (_u8(pb, base + 4 + (w & 15)) >> ((w >> 4) * 4)) & 15
        out = _f16(pb, base) * q.to(tl.float32) + _f16(pb, base + 2)
    elif QT == 6:  # Q5_0: d | qh[4] | qs[16]
        base = row + (kk >> 5) * 22
        w = kk & 31
        hb = (_u8(pb, base + 2 + (w >> 3)) >> (w & 7)) & 1
        q = ((_u8(pb, base + 6 + (w & 15)) >> ((w >> 4) * 4)) & 15) | (hb << 4)
        out = _f16(pb, base) * (q - 16).to(tl.float32)
    elif QT == 7:  # Q5_1: d | m | qh[4] | qs[16]
        base = row + (kk >> 5) * 24
        w = kk & 31
        hb = (_u8(pb, base + 4 + (w >> 3)) >> (w & 7)) & 1
        q = ((_u8(pb, base + 8 + (w & 15)) >> ((w >> 4) * 4)) & 15) | (hb << 4)
        out = _f16(pb, base) * q.to(tl.float32) + _f16(pb, base + 2)
    elif QT == 8:  # Q8_0: d | qs[32] int8
        base = row + (kk >> 5) * 34
        q = _s8(_u8(pb, base + 2 + (kk & 31)))
        out = _f16(pb, base) * q.to(tl.float32)
    elif QT == 10:  # Q2_K: scales[16] | qs[64] | d | dmin
        base = row + (kk >> 8) * 84
        w = kk & 255
        sc = _u8(pb, base + (w >> 4))
        dl = _f16(pb, base + 80) * (sc & 15).to(tl.float32)
        ml = _f16(pb, base + 82) * (sc >> 4).to(tl.float32)
        q = (_u8(pb, base + 16 + (w >> 7) * 32 + (w & 31)) >> (((w >> 5) & 3) * 2)) & 3
        out = dl * q.to(tl.float32) - ml
    elif QT == 11:  # Q3_K: hmask[32] | qs[64] | scales[12] | d
        base = row + (kk >> 8) * 110
        w = kk & 255
        s = w >> 4
        low = (_u8(pb, base + 96 + (s & 7)) >> ((s >> 3) * 4)) & 15
        high = (_u8(pb, base + 104 + (s & 3)) >> ((s >> 2) * 2)) & 3
        dl = _f16(pb, base + 108) * ((low | (high << 4)) - 32).to(tl.float32)
        ql = (_u8(pb, base + 32 + (w >> 7) * 32 + (w & 31)) >> (((w >> 5) & 3) * 2)) & 3
        hb = (_u8(pb, base + (w & 31)) >> (w >> 5)) & 1
        # a set hmask bit means "no -4"
        out = dl * (ql - ((1 - hb) << 2)).to(tl.float32)
    elif QT == 12 or QT == 13:  # Q4_K / Q5_K: d | dmin | scales[12] | (qh[32]) | qs[128]
        if QT == 12:
            base = row + (kk >> 8) * 144
        else:
            base = row + (kk >> 8) * 176
        w = kk & 255
        j = w >> 5
        sc, mn = _k4_scale_min(pb, base + 4, j)
        dd = _f16(pb, base) * sc.to(tl.float32)
        dm = _f16(pb, base + 2) * mn.to(tl.float32)
        if QT == 12:
            qoff = 16
        else:
            qoff = 48
        q = (_u8(pb, base + qoff + (w >> 6) * 32 + (w & 31)) >> (((w >> 5) & 1) * 4)) & 15
        if QT == 13:
            q = q | (((_u8(pb, base + 16 + (w & 31)) >> j) & 1) << 4)
        out = dd * q.to(tl.float32) - dm
    else:  # QT == 14, Q6_K: ql[128] | qh[64] | scales[16] int8 | d
        base = row + (kk >> 8) * 210
        w = kk & 255
        h = w >> 7
        r = w & 127
        lo = (_u8(pb, base + h * 64 + (r & 63)) >> ((r >> 6) * 4)) & 15
        hi = (_u8(pb, base + 128 + h * 32 + (r & 31)) >> ((r >> 5) * 2)) & 3
        sc = _s8(_u8(pb, base + 192 + (w >> 4)))
        dl = _f16(pb, base + 208) * sc.to(tl.float32)
        out = dl * ((lo | (hi << 4)) - 32).to(tl.float32)
    return out


@triton.jit
def cast_to(v, dt: tl.constexpr, SOFT_BF16: tl.constexpr):
    """``v.to(dt)``, rounding to nearest even.

    SOFT_BF16 (set only under the CPU interpreter, whose fp32 -> bf16 cast
    truncates) does the bf16 rounding with integer ops; GPUs round to nearest
    even natively.
    """
    if SOFT_BF16 and dt == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        r = bits + 0x7FFF + ((bits >> 16) & 1)
        r = tl.where(v != v, bits | 0x400000, r)  # NaN stays a (quiet) NaN
        return (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dt)


@triton.jit
def w_tile(
    p0, p1, p2, p3, p4, p5, nn, kk, k0, N, K, i0, i1,
    FMT: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, UNIFORM: tl.constexpr,
):
    """fp32 weights at (nn, kk) (stored column order), 0 outside (N, K).

    ``k0`` is the first column of the tile (always < K); UNIFORM (set by the
    host from the config's BK) says the tile's columns share one scale group.

    Indices are clamped so every gather is in bounds and no load needs a mask;
    out-of-range results are then zeroed.
    """
    inside = (nn < N) & (kk < K)
    n = tl.minimum(nn, N - 1).to(tl.int64)
    k = tl.minimum(kk, K - 1)
    if FMT == 1:
        # Int: p0 qweight, p1 scales, p2 zeros; i0 row bytes, i1 groups;
        # C0 bits, C1 has zeros, C2 log2(group size) or 0 (per channel)
        w = _int_tile(p0, p1, p2, n, k, k0, i0, i1, C0, C1, C2, UNIFORM)
    elif FMT == 2:
        # NF4: p0 qweight, p1 absmax | absmax_q, p2 absmax_scale, p3 absmax_offset,
        # p4 codebook, p5 dynamic map
        w = _nf4_tile(p0, p1, p2, p3, p4, p5, n, k, k0, K, C0, C1, UNIFORM)
    else:
        # GGUF: p0 raw blocks; i0 row bytes; C0 the ggml type id
        w = _gguf_tile(p0, n, k, i0, C0)
    return tl.where(inside, w, 0.0)


# --- word-wise: codes out of 32-bit words in registers ---------------------------
# Int layout (``pyquant/formats/int_format.py``): at 4 bits, byte j of a 32-code
# chunk = c[j] | c[j + 16] << 4, so byte b of word w holds codes 4 w + b (low
# nibble) and 16 + 4 w + b (high); at 8 bits byte j is c[j].
@triton.jit
def code_magic(w, P: tl.constexpr, BITS: tl.constexpr, OPQ):
    """The code at bit P of w as the fp32 MAGIC + q (16 + q at 4 bits, 256 + q at
    8): shifted under the exponent of MAGIC and or-ed with it. OPQ is an opaque 0
    (a value the compiler cannot fold, see ``gemv_packed_kernel``)."""
    if BITS == 4:
        if P <= 19:
            t = w << (19 - P)
        else:
            t = w >> (P - 19)
        return ((t & (0x780000 + OPQ)) | 0x41800000).to(tl.float32, bitcast=True)
    else:
        if P <= 15:
            t = w << (15 - P)
        else:
            t = w >> (P - 15)
        return ((t & (0x7F8000 + OPQ)) | 0x43800000).to(tl.float32, bitcast=True)


@triton.jit
def nf4_level(w, P: tl.constexpr, cb):
    # NF4 level of the code at bit P of w (the 16 fp32 levels stay in L1)
    return tl.load(cb + ((w >> P) & 15))


@triton.jit
def _q16(w, P: tl.constexpr, MASK: tl.constexpr, DT: tl.constexpr, ZC: tl.constexpr, OPQ):
    # the code q at bit P of w, minus the constant ZC, as an exact integer in DT
    q = (w >> P) & MASK
    if DT == tl.float16:
        # 0x6400 | q is the fp16 1024 + q (q < 1024): one subtraction (two codes per
        # HADD2), no int -> float conversion. (OPQ, an opaque 0, keeps the byte
        # extraction of 8-bit codes as one PRMT; for nibbles it would cost more.)
        if MASK == 255:
            q = q | (0x6400 + OPQ)
        else:
            q = q | 0x6400
        return q.to(tl.int16).to(tl.float16, bitcast=True) - (1024.0 + ZC)
    elif DT == tl.bfloat16 and MASK == 15:
        return (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - (128.0 + ZC)
    else:
        return (q - ZC).to(tl.float32).to(DT)


@triton.jit
def _join4(a, b, c, d):
    # [..., 4] = (a, b, c, d): join appends the new axis last, so the inner joins pair
    # (a, c) and (b, d) and the outer one interleaves them
    return tl.join(tl.join(a, c), tl.join(b, d))


@triton.jit
def codes_tile(w, BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, ZC: tl.constexpr,
               OPQ):
    """Words [BN, BK * BITS / 32] -> codes - ZC [BN, BK] in stored column order, exact in DT."""
    if BITS == 4:
        # byte b of word wl of a chunk holds codes 4 wl + b (low nibble) and 16 + 4 wl + b (high)
        lo = _join4(_q16(w, 0, 15, DT, ZC, OPQ), _q16(w, 8, 15, DT, ZC, OPQ),
                    _q16(w, 16, 15, DT, ZC, OPQ), _q16(w, 24, 15, DT, ZC, OPQ))
        hi = _join4(_q16(w, 4, 15, DT, ZC, OPQ), _q16(w, 12, 15, DT, ZC, OPQ),
                    _q16(w, 20, 15, DT, ZC, OPQ), _q16(w, 28, 15, DT, ZC, OPQ))
        q = tl.join(lo, hi)  # [BN, BKW, 4 (b), 2 (hi)]  (join appends the new axis last)
        q = tl.reshape(q, (BN, BK // 32, 4, 4, 2))  # chunk, wl, b, hi
        q = tl.permute(q, (0, 1, 4, 2, 3))  # chunk, hi, wl, b
    else:
        q = _join4(_q16(w, 0, 255, DT, ZC, OPQ), _q16(w, 8, 255, DT, ZC, OPQ),
                   _q16(w, 16, 255, DT, ZC, OPQ), _q16(w, 24, 255, DT, ZC, OPQ))
    return tl.reshape(q, (BN, BK))
