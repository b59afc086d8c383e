"""Word-wise GEMV: Int4 / Int8 / NF4 weights read as 32-bit words.

The generic decoder (``decode.w_tile``) gathers every code's byte with its own
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
"""
import triton
import triton.language as tl

from ..decode import cast_to, code_magic, nf4_dq_absmax, nf4_level


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
def _word_dot(p, sx, w, xr, kk, WOFF: tl.constexpr, K, perm, OPQ, cb, X16: tl.constexpr, BITS: tl.constexpr,
              MASKED: tl.constexpr, HAS_PERM: tl.constexpr, NF4: tl.constexpr):
    # Int: p += sum over the codes of word w (word WOFF of its chunk) of (MAGIC + q) * x;
    # sx += sum x. NF4: p += sum of level * x (no zero point: sx stays 0).
    if NF4:
        # bitsandbytes' order: byte b holds values 2b (high nibble) and 2b + 1 (low)
        x0, x1, x2, x3 = _x4(xr, kk, 8 * WOFF, K, perm, X16, MASKED, HAS_PERM)
        x4, x5, x6, x7 = _x4(xr, kk, 8 * WOFF + 4, K, perm, X16, MASKED, HAS_PERM)
        p += nf4_level(w, 4, cb) * x0[None, :]
        p += nf4_level(w, 0, cb) * x1[None, :]
        p += nf4_level(w, 12, cb) * x2[None, :]
        p += nf4_level(w, 8, cb) * x3[None, :]
        p += nf4_level(w, 20, cb) * x4[None, :]
        p += nf4_level(w, 16, cb) * x5[None, :]
        p += nf4_level(w, 28, cb) * x6[None, :]
        p += nf4_level(w, 24, cb) * x7[None, :]
    elif BITS == 4:
        for h in tl.static_range(2):
            x0, x1, x2, x3 = _x4(xr, kk, 4 * WOFF + 16 * h, K, perm, X16, MASKED, HAS_PERM)
            p += code_magic(w, 4 * h, 4, OPQ) * x0[None, :]
            p += code_magic(w, 8 + 4 * h, 4, OPQ) * x1[None, :]
            p += code_magic(w, 16 + 4 * h, 4, OPQ) * x2[None, :]
            p += code_magic(w, 24 + 4 * h, 4, OPQ) * x3[None, :]
            sx += (x0 + x1) + (x2 + x3)
    else:
        x0, x1, x2, x3 = _x4(xr, kk, 4 * WOFF, K, perm, X16, MASKED, HAS_PERM)
        p += code_magic(w, 0, 8, OPQ) * x0[None, :]
        p += code_magic(w, 8, 8, OPQ) * x1[None, :]
        p += code_magic(w, 16, 8, OPQ) * x2[None, :]
        p += code_magic(w, 24, 8, OPQ) * x3[None, :]
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
            s = nf4_dq_absmax(sc, zr, am_off, dmap, blk)
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
