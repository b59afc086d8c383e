"""Word-wise tensor-core matmul (``mm_int_kernel``: split-K and GEMM) for Int4 / Int8.

Each K tile of a row is loaded as 32-bit words (16-byte vector loads, streamed
through shared memory by Triton's pipeliner) and the words become exact integers
in fp16/bf16 in registers (``decode.codes_tile``: 0x6400 | q is the fp16
1024 + q, one LOP3 and one packed subtraction per two codes), joined into a
[BN, BK] tile in stored K order for ``tl.dot``. A K tile lies in one scale
group; either the dot of the exact codes is scaled per output
(s * (x . q - z * sum x), few rows) or the decoded tile is scaled before the
dot (more rows), see ``args.scale_weights``.
"""
import triton
import triton.language as tl

from ..decode import cast_to, codes_tile
from .epilogue import epilogue
from .tiles import grouped_tile


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
        q = codes_tile(w, BN, BK, BITS, DQ, 0, tl.minimum(K, 0))
    else:
        q = codes_tile(w, BN, BK, BITS, DQ, 1 << (BITS - 1), tl.minimum(K, 0))
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
