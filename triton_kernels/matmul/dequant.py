"""Dequantize kernel: the decoded weight, bit-exact against the reference
(launched with ``enable_fp_fusion=False``)."""
import triton
import triton.language as tl

from ..decode import cast_to, w_tile


@triton.jit
def dequant_kernel(
    out, perm, p0, p1, p2, p3, p4, p5, N, K, i0, i1,
    FMT: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, UNIFORM: tl.constexpr,
    HAS_PERM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    nn = offs_n[:, None]
    kk = offs_k[None, :]
    w = w_tile(p0, p1, p2, p3, p4, p5, nn, kk, tl.program_id(1) * BK, N, K, i0, i1, FMT, C0, C1, C2, UNIFORM)
    mask = (nn < N) & (kk < K)
    if HAS_PERM:
        # stored column j is logical column perm[j]
        col = tl.load(perm + kk, mask=kk < K, other=0).to(tl.int64)
    else:
        col = kk.to(tl.int64)
    tl.store(out + nn.to(tl.int64) * K + col, cast_to(w, out.dtype.element_ty, SOFT_BF16), mask=mask)
