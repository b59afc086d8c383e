"""Generic GEMV (M <= 4, CUDA cores), every format through ``decode.w_tile``.

A ``[BN, BK]`` weight tile is decoded once and multiplied with every activation
row (a ``[BM, BN, BK]`` broadcast reduced over K).
"""
import triton
import triton.language as tl

from ..decode import w_tile
from .epilogue import epilogue
from .tiles import x_tile


@triton.jit
def gemv_kernel(
    x, out, ws, bias, perm, p0, p1, p2, p3, p4, p5, M, N, K, k_per_split, i0, i1,
    FMT: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, UNIFORM: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    mm = offs_m[:, None].to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        w = w_tile(p0, p1, p2, p3, p4, p5, offs_n[:, None], offs_k[None, :], k0, N, K, i0, i1,
                   FMT, C0, C1, C2, UNIFORM)
        xt = x_tile(x, perm, mm, offs_k[None, :], M, K, HAS_PERM).to(tl.float32)
        acc += tl.sum(xt[:, None, :] * w[None, :, :], axis=2)
    epilogue(acc, out, ws, bias, offs_m, offs_n, M, N, pid_s, SPLIT, HAS_BIAS, SOFT_BF16)
