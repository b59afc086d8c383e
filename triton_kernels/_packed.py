"""Word-wise kernels: Int4 / Int8 (and NF4 on the GEMV) read as 32-bit words.

The generic decoder (``_tiles.w_tile``) gathers every code's byte with its own
address: one load instruction per weight plus its address arithmetic (~35
instructions per weight in the sm_90 build of the M = 1 GEMV). These kernels load
each 32-code chunk of a row (16 bytes at 4 bits, 32 at 8) as int32 words with
16-byte vector loads and unpack it in registers. The K order *inside* a chunk is
free in a dot product, so x is read in the order the codes come out of the words
(the weights are never shuffled). See ``pyquant/formats/int_format.py`` for the
layout: at 4 bits, byte j of a chunk = c[j] | c[j + 16] << 4, so byte b of word w
holds codes 4 w + b (low nibble) and 16 + 4 w + b (high).

GEMV (``gemv_packed_kernel``, M <= 4 per program, CUDA cores)
    A thread owns one chunk of BN / num_warps rows per K tile: its four words are
    one 16-byte load per row, and its 32 x values (fp16/bf16) four 8-byte loads
    shared by those rows. A code becomes the fp32 16 + q (8 bits: 256 + q) with one
    shift and one LOP3 (it lands in the mantissa under the exponent of 16.0), then
    one FMA with x: y += s * (sum (16 + q) x - (16 + z) * sum x) per (row, chunk),
    so scales and zeros cost two multiply-adds per 32 weights, not one per weight
    (per channel: once after the loop). fp32 accumulation throughout; the 16 + q
    values are exact and of the size of q, so nothing is lost to the offset.
    The loop takes two K tiles per iteration and loads each tile's words and
    scales one tile ahead: two tiles of weights in flight per thread.

Tensor cores (``mm_int_kernel``, split-K and GEMM)
    The same words become exact integers in fp16/bf16 (0x6400 | q is the fp16
    1024 + q: one LOP3 and one packed subtraction per two codes), joined into a
    [BN, BK] tile in stored K order for ``tl.dot``. A K tile lies in one scale
    group; either the dot of the exact codes is scaled per output
    (s * (x . q - z * sum x), few rows) or the decoded tile is scaled before the
    dot (more rows), see ``_launch.scale_weights``.
"""
import triton
import triton.language as tl

from ._kernels import epilogue, grouped_tile
from ._tiles import cast_to


@triton.jit
def _code(w, P: tl.constexpr, BITS: tl.constexpr, OPQ):
    # the code at bit P of w as the fp32 MAGIC + q (16 + q at 4 bits, 256 + q at 8):
    # shifted under the exponent of MAGIC and or-ed with it. OPQ is an opaque 0
    # (see gemv_packed_kernel).
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
def _split4(w3, BN: tl.constexpr, CH: tl.constexpr):
    # [BN, CH, 4] words -> the four [BN, CH] words of each chunk (register renaming)
    a, b = tl.split(tl.reshape(w3, (BN, CH, 2, 2)))
    w0, w2 = tl.split(a)
    w1, w3_ = tl.split(b)
    return w0, w1, w2, w3_


@triton.jit
def _xs(xr, kk, off: tl.constexpr, K, perm, MASKED: tl.constexpr, HAS_PERM: tl.constexpr):
    # fp32 x[row, stored column kk + off]; xr = x row pointer
    if HAS_PERM:
        if MASKED:
            col = tl.load(perm + kk + off, mask=kk + off < K, other=0)
            v = tl.load(xr + col, mask=kk + off < K, other=0.0)
        else:
            v = tl.load(xr + tl.load(perm + kk + off))
    else:
        if MASKED:
            v = tl.load(xr + kk + off, mask=kk + off < K, other=0.0)
        else:
            v = tl.load(xr + kk + off)
    return v.to(tl.float32)


@triton.jit
def _h2f(v, X16: tl.constexpr):
    # low 16 bits of v (an fp16 or bf16 pattern) -> fp32
    if X16 == 2:
        return (v.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _x4(xr, kk, off: tl.constexpr, K, perm, X16: tl.constexpr, MASKED: tl.constexpr, HAS_PERM: tl.constexpr):
    # fp32 x at stored columns kk + off + 0..3, as four [CH] vectors
    if X16 != 0 and not MASKED and not HAS_PERM:
        # fp16/bf16 x, 8-byte aligned rows: one 8-byte load per chunk, unpacked in registers
        v = tl.load((xr + kk + off).to(tl.pointer_type(tl.int64)))
        return (_h2f(v, X16), _h2f(v >> 16, X16), _h2f(v >> 32, X16), _h2f(v >> 48, X16))
    else:
        return (_xs(xr, kk, off, K, perm, MASKED, HAS_PERM), _xs(xr, kk, off + 1, K, perm, MASKED, HAS_PERM),
                _xs(xr, kk, off + 2, K, perm, MASKED, HAS_PERM), _xs(xr, kk, off + 3, K, perm, MASKED, HAS_PERM))


@triton.jit
def _nf4(w, P: tl.constexpr, cb):
    # NF4 level of the code at bit P of w (the 16 fp32 levels stay in L1)
    return tl.load(cb + ((w >> P) & 15))


@triton.jit
def _word_dot(p, sx, w, xr, kk, WOFF: tl.constexpr, K, perm, OPQ, cb, X16: tl.constexpr, BITS: tl.constexpr,
              MASKED: tl.constexpr, HAS_PERM: tl.constexpr, NF4: tl.constexpr):
    # Int: p += sum over the codes of word w (word WOFF of its chunk) of (MAGIC + q) * x;
    # sx += sum x. NF4: p += sum of level * x (no zero point: sx stays 0).
    if NF4:
        # bitsandbytes' order: byte b holds values 2b (high nibble) and 2b + 1 (low)
        x0, x1, x2, x3 = _x4(xr, kk, 8 * WOFF, K, perm, X16, MASKED, HAS_PERM)
        x4, x5, x6, x7 = _x4(xr, kk, 8 * WOFF + 4, K, perm, X16, MASKED, HAS_PERM)
        p += _nf4(w, 4, cb) * x0[None, :]
        p += _nf4(w, 0, cb) * x1[None, :]
        p += _nf4(w, 12, cb) * x2[None, :]
        p += _nf4(w, 8, cb) * x3[None, :]
        p += _nf4(w, 20, cb) * x4[None, :]
        p += _nf4(w, 16, cb) * x5[None, :]
        p += _nf4(w, 28, cb) * x6[None, :]
        p += _nf4(w, 24, cb) * x7[None, :]
    elif BITS == 4:
        for h in tl.static_range(2):
            x0, x1, x2, x3 = _x4(xr, kk, 4 * WOFF + 16 * h, K, perm, X16, MASKED, HAS_PERM)
            p += _code(w, 4 * h, 4, OPQ) * x0[None, :]
            p += _code(w, 8 + 4 * h, 4, OPQ) * x1[None, :]
            p += _code(w, 16 + 4 * h, 4, OPQ) * x2[None, :]
            p += _code(w, 24 + 4 * h, 4, OPQ) * x3[None, :]
            sx += (x0 + x1) + (x2 + x3)
    else:
        x0, x1, x2, x3 = _x4(xr, kk, 4 * WOFF, K, perm, X16, MASKED, HAS_PERM)
        p += _code(w, 0, 8, OPQ) * x0[None, :]
        p += _code(w, 8, 8, OPQ) * x1[None, :]
        p += _code(w, 16, 8, OPQ) * x2[None, :]
        p += _code(w, 24, 8, OPQ) * x3[None, :]
        sx += (x0 + x1) + (x2 + x3)
    return p, sx


@triton.jit
def _chunk_dot(wa, wb, xr, kk, K, perm, OPQ, cb, BN: tl.constexpr, CH: tl.constexpr, X16: tl.constexpr,
               BITS: tl.constexpr, MASKED: tl.constexpr, HAS_PERM: tl.constexpr, NF4: tl.constexpr):
    """Per (row, chunk): sum over the chunk's 32 codes of (MAGIC + q) * x, and per chunk the sum of x."""
    w0, w1, w2, w3 = _split4(wa, BN, CH)
    p = tl.zeros((BN, CH), dtype=tl.float32)
    sx = tl.zeros((CH,), dtype=tl.float32)
    p, sx = _word_dot(p, sx, w0, xr, kk, 0, K, perm, OPQ, cb, X16, BITS, MASKED, HAS_PERM, NF4)
    p, sx = _word_dot(p, sx, w1, xr, kk, 1, K, perm, OPQ, cb, X16, BITS, MASKED, HAS_PERM, NF4)
    p, sx = _word_dot(p, sx, w2, xr, kk, 2, K, perm, OPQ, cb, X16, BITS, MASKED, HAS_PERM, NF4)
    p, sx = _word_dot(p, sx, w3, xr, kk, 3, K, perm, OPQ, cb, X16, BITS, MASKED, HAS_PERM, NF4)
    if BITS == 8:
        w4, w5, w6, w7 = _split4(wb, BN, CH)
        p, sx = _word_dot(p, sx, w4, xr, kk, 4, K, perm, OPQ, cb, X16, BITS, MASKED, HAS_PERM, NF4)
        p, sx = _word_dot(p, sx, w5, xr, kk, 5, K, perm, OPQ, cb, X16, BITS, MASKED, HAS_PERM, NF4)
        p, sx = _word_dot(p, sx, w6, xr, kk, 6, K, perm, OPQ, cb, X16, BITS, MASKED, HAS_PERM, NF4)
        p, sx = _word_dot(p, sx, w7, xr, kk, 7, K, perm, OPQ, cb, X16, BITS, MASKED, HAS_PERM, NF4)
    return p, sx


@triton.jit
def _scaled(acc, accx, p, sx, s, z, GSHIFT: tl.constexpr, NF4: tl.constexpr):
    if NF4:
        return acc + s * p, accx
    elif GSHIFT == 0:
        # per channel: scale and zero are applied once after the loop
        return acc + p, accx + sx[None, :]
    else:
        return acc + s * (p - z * sx[None, :]), accx


@triton.jit
def _load_words(wp, cw, cm, BITS: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        wa = tl.load(wp + cw, mask=cm, other=0)
        if BITS == 8:
            wb = tl.load(wp + cw + 4, mask=cm, other=0)
        else:
            wb = wa
    else:
        wa = tl.load(wp + cw)
        if BITS == 8:
            wb = tl.load(wp + cw + 4)
        else:
            wb = wa
    return wa, wb


@triton.jit
def _tile_scales(sc, zr, am_off, dmap, rows_c, ng, kk, BN: tl.constexpr, CH: tl.constexpr, BITS: tl.constexpr,
                 HAS_ZERO: tl.constexpr, GSHIFT: tl.constexpr, NF4: tl.constexpr, DQ: tl.constexpr):
    """fp32 scale and MAGIC + zero of every (row, chunk) of a K tile (chunks never
    straddle groups); per channel (GSHIFT 0) unused placeholders. NF4: the absmax of
    the chunk's block (rows are whole blocks), decoded from the nested 8-bit
    statistics with DQ as bitsandbytes does (two roundings)."""
    MAGIC: tl.constexpr = 16.0 if BITS == 4 else 256.0
    if NF4:
        blk = rows_c[:, None] * ng + tl.minimum(kk >> GSHIFT, ng - 1)[None, :]
        if DQ:
            s = tl.load(dmap + tl.load(sc + blk).to(tl.int32)) * tl.load(zr + (blk >> 8))
            s = s + tl.load(am_off)
        else:
            s = tl.load(sc + blk)
        z = tl.zeros((1, 1), dtype=tl.float32)
    elif GSHIFT == 0:
        s = tl.zeros((1, 1), dtype=tl.float32)
        z = s
    else:
        # chunks past K (ragged tail, or a tile that is not loaded) read the row's
        # last group: in bounds, and multiplied by x = 0
        gi = rows_c[:, None] * ng + tl.minimum(kk >> GSHIFT, ng - 1)[None, :]
        s = tl.load(sc + gi).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(zr + gi).to(tl.float32) + MAGIC
        else:
            z = tl.full((BN, CH), MAGIC + (1 << (BITS - 1)), tl.float32)
    return s, z


@triton.jit
def _step(acc0, acc1, acc2, acc3, ax0, ax1, ax2, ax3, wa, wb, s, z, x0, x1, x2, x3, perm, k0, K,
          ch, OPQ, cb, BM: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, X16: tl.constexpr, BITS: tl.constexpr,
          GSHIFT: tl.constexpr, MASKED: tl.constexpr, HAS_PERM: tl.constexpr, NF4: tl.constexpr):
    """One K tile: the decoded weights (shared by every activation row) times up to 4 rows of x."""
    kk = k0 + ch * 32
    p, sx = _chunk_dot(wa, wb, x0, kk, K, perm, OPQ, cb, BN, CH, X16, BITS, MASKED, HAS_PERM, NF4)
    acc0, ax0 = _scaled(acc0, ax0, p, sx, s, z, GSHIFT, NF4)
    if BM > 1:
        p, sx = _chunk_dot(wa, wb, x1, kk, K, perm, OPQ, cb, BN, CH, X16, BITS, MASKED, HAS_PERM, NF4)
        acc1, ax1 = _scaled(acc1, ax1, p, sx, s, z, GSHIFT, NF4)
    if BM > 2:
        p, sx = _chunk_dot(wa, wb, x2, kk, K, perm, OPQ, cb, BN, CH, X16, BITS, MASKED, HAS_PERM, NF4)
        acc2, ax2 = _scaled(acc2, ax2, p, sx, s, z, GSHIFT, NF4)
        p, sx = _chunk_dot(wa, wb, x3, kk, K, perm, OPQ, cb, BN, CH, X16, BITS, MASKED, HAS_PERM, NF4)
        acc3, ax3 = _scaled(acc3, ax3, p, sx, s, z, GSHIFT, NF4)
    return acc0, acc1, acc2, acc3, ax0, ax1, ax2, ax3


@triton.jit
def _finish(acc, accx, m0, m: tl.constexpr, out, ws, bias, sc, zr, rows, rows_c, ng, M, N, pid_s, BITS: tl.constexpr,
            HAS_ZERO: tl.constexpr, GSHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
            SOFT_BF16: tl.constexpr):
    MAGIC: tl.constexpr = 16.0 if BITS == 4 else 256.0
    y = tl.sum(acc, axis=1)
    if GSHIFT == 0:
        s = tl.load(sc + rows_c * ng).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(zr + rows_c * ng).to(tl.float32) + MAGIC
        else:
            z = MAGIC + (1 << (BITS - 1))
        y = s * (y - z * tl.sum(tl.sum(accx, axis=1), axis=0))
    row = m0 + m
    ok = (rows < N) & (rows * 0 + row < M)
    if SPLIT == 1:
        if HAS_BIAS:
            y = y + tl.load(bias + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(out + row.to(tl.int64) * N + rows, cast_to(y, out.dtype.element_ty, SOFT_BF16), mask=ok)
    else:
        tl.store(ws + (pid_s * M + row).to(tl.int64) * N + rows, y, mask=ok)


@triton.jit
def gemv_packed_kernel(
    x, out, ws, bias, perm, qw, sc, zr, aux0, aux1, aux2, M, N, K, k_per_split, row_bytes, ng,
    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, GSHIFT: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
    X16: tl.constexpr, SOFT_BF16: tl.constexpr, NF4: tl.constexpr, DQ: tl.constexpr,
):
    WPC: tl.constexpr = BITS  # int32 words per 32-code chunk
    CH: tl.constexpr = BK // 32
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    # A value the compiler cannot fold: keeps the decode masks as LOP3 operands instead of
    # constants rematerialised before every use (one extra instruction per weight otherwise).
    OPQ = tl.minimum(K, 0)
    cb = aux1  # NF4 levels
    rows = pid_n * BN + tl.arange(0, BN)
    rows_c = tl.minimum(rows, N - 1)
    row_words = row_bytes // 4
    ch = tl.arange(0, CH)
    cw = ch[None, :, None] * WPC + tl.arange(0, 4)[None, None, :]
    wrow = qw.to(tl.pointer_type(tl.int32)) + rows_c.to(tl.int64)[:, None, None] * row_words
    # activation rows m0 .. m0 + BM - 1; rows past M re-read row M - 1 (in bounds)
    # and are not stored
    m0 = tl.program_id(2) * BM
    x0 = x + m0.to(tl.int64) * K
    x1 = x + tl.minimum(m0 + 1, M - 1).to(tl.int64) * K
    x2 = x + tl.minimum(m0 + 2, M - 1).to(tl.int64) * K
    x3 = x + tl.minimum(m0 + 3, M - 1).to(tl.int64) * K
    acc0 = tl.zeros((BN, CH), dtype=tl.float32)
    acc1 = tl.zeros((BN, CH), dtype=tl.float32)
    acc2 = tl.zeros((BN, CH), dtype=tl.float32)
    acc3 = tl.zeros((BN, CH), dtype=tl.float32)
    ax0 = tl.zeros((1, CH), dtype=tl.float32)
    ax1 = tl.zeros((1, CH), dtype=tl.float32)
    ax2 = tl.zeros((1, CH), dtype=tl.float32)
    ax3 = tl.zeros((1, CH), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    k_full = k_lo + (k_hi - k_lo) // BK * BK
    k_pairs = k_lo + (k_full - k_lo) // (2 * BK) * (2 * BK)
    k_last = tl.maximum(k_full - BK, k_lo)
    # Full tiles, unmasked, two per iteration (tiles A and B): each tile's words and
    # scales are loaded one tile of work ahead of their use, so two tiles of weights
    # are in flight per thread and no iteration waits on a DRAM round trip. Unrolled
    # by two so that the loads land in their final registers (a one-tile loop would
    # copy every prefetched register at the back edge).
    wa, wb = _load_words(wrow + (k_lo // 32) * WPC, cw, (ch * 0 + k_lo < k_full)[None, :, None], BITS, True)
    s, z = _tile_scales(sc, zr, aux0, aux2, rows_c, ng, k_lo + ch * 32, BN, CH, BITS, HAS_ZERO, GSHIFT, NF4, DQ)
    for k0 in range(k_lo, k_pairs, 2 * BK):
        ua, ub = _load_words(wrow + ((k0 + BK) // 32) * WPC, cw, True, BITS, False)
        t, u = _tile_scales(sc, zr, aux0, aux2, rows_c, ng, k0 + BK + ch * 32, BN, CH, BITS, HAS_ZERO, GSHIFT, NF4, DQ)
        acc0, acc1, acc2, acc3, ax0, ax1, ax2, ax3 = _step(
            acc0, acc1, acc2, acc3, ax0, ax1, ax2, ax3, wa, wb, s, z, x0, x1, x2, x3, perm, k0, K,
            ch, OPQ, cb, BM, BN, CH, X16, BITS, GSHIFT, False, HAS_PERM, NF4)
        k_next = tl.minimum(k0 + 2 * BK, k_last)
        wa, wb = _load_words(wrow + (k_next // 32) * WPC, cw, True, BITS, False)
        s, z = _tile_scales(sc, zr, aux0, aux2, rows_c, ng, k_next + ch * 32, BN, CH, BITS, HAS_ZERO, GSHIFT, NF4, DQ)
        acc0, acc1, acc2, acc3, ax0, ax1, ax2, ax3 = _step(
            acc0, acc1, acc2, acc3, ax0, ax1, ax2, ax3, ua, ub, t, u, x0, x1, x2, x3, perm, k0 + BK, K,
            ch, OPQ, cb, BM, BN, CH, X16, BITS, GSHIFT, False, HAS_PERM, NF4)
    if k_pairs < k_full:
        # an odd number of full tiles: the last one is already loaded
        acc0, acc1, acc2, acc3, ax0, ax1, ax2, ax3 = _step(
            acc0, acc1, acc2, acc3, ax0, ax1, ax2, ax3, wa, wb, s, z, x0, x1, x2, x3, perm, k_pairs, K,
            ch, OPQ, cb, BM, BN, CH, X16, BITS, GSHIFT, False, HAS_PERM, NF4)
    if k_full < k_hi:
        # ragged last tile: chunks past K are not loaded, columns past K read x = 0
        wa, wb = _load_words(wrow + (k_full // 32) * WPC, cw, (k_full + ch * 32 < K)[None, :, None], BITS, True)
        s, z = _tile_scales(sc, zr, aux0, aux2, rows_c, ng, k_full + ch * 32, BN, CH, BITS, HAS_ZERO, GSHIFT, NF4, DQ)
        acc0, acc1, acc2, acc3, ax0, ax1, ax2, ax3 = _step(
            acc0, acc1, acc2, acc3, ax0, ax1, ax2, ax3, wa, wb, s, z, x0, x1, x2, x3, perm, k_full,
            K, ch, OPQ, cb, BM, BN, CH, X16, BITS, GSHIFT, True, HAS_PERM, NF4)
    _finish(acc0, ax0, m0, 0, out, ws, bias, sc, zr, rows, rows_c, ng, M, N, pid_s, BITS, HAS_ZERO, GSHIFT, HAS_BIAS,
            SPLIT, SOFT_BF16)
    if BM > 1:
        _finish(acc1, ax1, m0, 1, out, ws, bias, sc, zr, rows, rows_c, ng, M, N, pid_s, BITS, HAS_ZERO, GSHIFT,
                HAS_BIAS, SPLIT, SOFT_BF16)
    if BM > 2:
        _finish(acc2, ax2, m0, 2, out, ws, bias, sc, zr, rows, rows_c, ng, M, N, pid_s, BITS, HAS_ZERO, GSHIFT,
                HAS_BIAS, SPLIT, SOFT_BF16)
        _finish(acc3, ax3, m0, 3, out, ws, bias, sc, zr, rows, rows_c, ng, M, N, pid_s, BITS, HAS_ZERO, GSHIFT,
                HAS_BIAS, SPLIT, SOFT_BF16)


# --- tensor-core path (split-K / GEMM) -------------------------------------------
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
def _codes_tile(w, BN: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, ZC: tl.constexpr,
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


@triton.jit
def _mm_scales(sc, zr, rows_c, ng, k0, BN: tl.constexpr, HAS_ZERO: tl.constexpr, GSHIFT: tl.constexpr):
    """fp32 scale and zero of every row for the K tile at k0 (one group per tile);
    per channel (GSHIFT 0) unused placeholders."""
    if GSHIFT == 0:
        s = tl.zeros((BN,), dtype=tl.float32)
        z = s
    else:
        # a tile past the end (prefetch after the last one) reads the last group
        gi = rows_c * ng + tl.minimum(k0 >> GSHIFT, ng - 1)
        s = tl.load(sc + gi).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(zr + gi).to(tl.float32)
        else:
            z = tl.zeros((BN,), dtype=tl.float32)
    return s, z


@triton.jit
def _mm_step(acc, accx, s, z, wp, xr, perm, k0, K, row_words, BN: tl.constexpr, BK: tl.constexpr,
             BITS: tl.constexpr, HAS_ZERO: tl.constexpr, GSHIFT: tl.constexpr, HAS_PERM: tl.constexpr,
             X_F32: tl.constexpr, UPCAST_DOT: tl.constexpr, MASKED: tl.constexpr, DT: tl.constexpr,
             SCALE_W: tl.constexpr):
    """One K tile; ``s``, ``z``: its per-row scales and zeros (``_mm_scales``)."""
    BKW: tl.constexpr = BK * BITS // 32
    kw = (k0 // 32) * BITS + tl.arange(0, BKW)
    kk = k0 + tl.arange(0, BK)
    if MASKED:
        w = tl.load(wp + kw[None, :], mask=(kw < row_words)[None, :], other=0)
    else:
        w = tl.load(wp + kw[None, :])
    # symmetric weights: the implicit zero point is subtracted from the codes (exact),
    # so no sum of x is needed.
    # (the CPU interpreter's bf16 arithmetic is unreliable: there the codes are
    # decoded in fp32, and rounded to bf16 as the GPU would)
    if UPCAST_DOT:
        DQ: tl.constexpr = tl.float32
    else:
        DQ: tl.constexpr = DT
    if HAS_ZERO:
        q = _codes_tile(w, BN, BK, BITS, DQ, 0, tl.minimum(K, 0))
    else:
        q = _codes_tile(w, BN, BK, BITS, DQ, 1 << (BITS - 1), tl.minimum(K, 0))
    if SCALE_W:
        # more rows: scale the decoded tile (BN * BK multiply-adds) instead of the
        # BM * BN product after every dot; s * (q - z) rounded once to DT
        zs = -z * s
        if UPCAST_DOT:
            s16 = cast_to(s, DT, True).to(tl.float32)
            zs = cast_to(zs, DT, True).to(tl.float32)
            q = cast_to(q * s16[:, None] + zs[:, None], DT, True).to(tl.float32)
        else:
            q = q * s.to(DT)[:, None] + zs.to(DT)[:, None]
    if HAS_PERM:
        if MASKED:
            col = tl.load(perm + kk, mask=kk < K, other=0)
        else:
            col = tl.load(perm + kk)
    else:
        col = kk
    if MASKED:
        xt = tl.load(xr + col[None, :], mask=(kk < K)[None, :], other=0.0)
    else:
        xt = tl.load(xr + col[None, :])
    if X_F32:
        d = tl.dot(xt, tl.trans(q), input_precision="ieee")
    elif UPCAST_DOT:
        # Triton's CPU interpreter multiplies bf16 operands as raw bits: the same
        # values in fp32 give the GPU's result up to the summation order
        d = tl.dot(xt.to(tl.float32), tl.trans(q), input_precision="ieee")
    else:
        d = tl.dot(xt, tl.trans(q))
    if SCALE_W:
        return acc + d, accx
    if HAS_ZERO:
        sx = tl.sum(xt.to(tl.float32), axis=1)
    if GSHIFT == 0:
        if HAS_ZERO:
            accx += sx[:, None]
        return acc + d, accx
    elif HAS_ZERO:
        return acc + s[None, :] * (d - z[None, :] * sx[:, None]), accx
    else:
        return acc + s[None, :] * d, accx


@triton.jit
def mm_int_kernel(
    x, out, ws, bias, perm, qw, sc, zr, M, N, K, k_per_split, row_bytes, ng,
    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, GSHIFT: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
    GROUP_M: tl.constexpr, X_F32: tl.constexpr, UPCAST_DOT: tl.constexpr, SOFT_BF16: tl.constexpr,
    SCALE_W: tl.constexpr,
):
    """``y = x @ W_hat.T`` for Int4/Int8 on tensor cores: each K tile is one dot of x with
    the exact integer codes, scaled per row afterwards: y += s * (x . q - z * sum(x))."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    pid_s = tl.program_id(1)
    if X_F32:
        DT: tl.constexpr = tl.float32
    else:
        DT: tl.constexpr = x.dtype.element_ty
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows_c = tl.minimum(offs_n, N - 1)
    # rows past M / N read row M - 1 / N - 1 (in bounds, never stored): no load masks
    xr = x + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * K
    row_words = row_bytes // 4
    wp = qw.to(tl.pointer_type(tl.int32)) + rows_c.to(tl.int64)[:, None] * row_words
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    accx = tl.zeros((BM, 1), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    k_full = k_lo + (k_hi - k_lo) // BK * BK
    # the scales of the next tile are loaded at the start of each iteration (Triton's
    # pipeliner streams the words and x through shared memory, but not these 2-byte loads)
    s, z = _mm_scales(sc, zr, rows_c, ng, k_lo, BN, HAS_ZERO, GSHIFT)
    for k0 in range(k_lo, k_full, BK):
        ns, nz = _mm_scales(sc, zr, rows_c, ng, k0 + BK, BN, HAS_ZERO, GSHIFT)
        acc, accx = _mm_step(acc, accx, s, z, wp, xr, perm, k0, K, row_words, BN, BK, BITS, HAS_ZERO,
                             GSHIFT, HAS_PERM, X_F32, UPCAST_DOT, False, DT, SCALE_W)
        s = ns
        z = nz
    if k_full < k_hi:
        acc, accx = _mm_step(acc, accx, s, z, wp, xr, perm, k_full, K, row_words, BN, BK, BITS,
                             HAS_ZERO, GSHIFT, HAS_PERM, X_F32, UPCAST_DOT, True, DT, SCALE_W)
    if GSHIFT == 0:
        s = tl.load(sc + rows_c * ng).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(zr + rows_c * ng).to(tl.float32)
            acc = acc - z[None, :] * accx
        acc = s[None, :] * acc
    epilogue(acc, out, ws, bias, offs_m, offs_n, M, N, pid_s, SPLIT, HAS_BIAS, SOFT_BF16)
