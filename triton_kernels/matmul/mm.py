"""Generic tensor-core matmul (split-K and GEMM: one kernel, SPLIT and GROUP_M
from the config), every format through ``decode.w_tile``."""
import triton
import triton.language as tl

from ..decode import cast_to, w_tile
from .epilogue import epilogue
from .tiles import grouped_tile, x_tile


@triton.jit
def mm_kernel(
    x, out, ws, bias, perm, p0, p1, p2, p3, p4, p5, M, N, K, k_per_split, i0, i1,
    FMT: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, UNIFORM: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, GROUP_M: tl.constexpr,
    X_F32: tl.constexpr, UPCAST_DOT: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mm = offs_m[:, None].to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        xt = x_tile(x, perm, mm, offs_k[None, :], M, K, HAS_PERM)
        # weight tile decoded directly in [BK, BN] orientation for the dot
        w = w_tile(p0, p1, p2, p3, p4, p5, offs_n[None, :], offs_k[:, None], k0, N, K, i0, i1,
                   FMT, C0, C1, C2, UNIFORM)
        if X_F32:
            acc = tl.dot(xt, w, acc, input_precision="ieee")
        elif UPCAST_DOT:
            # Triton's CPU interpreter multiplies bf16 operands as raw uint16
            # bits; the same bf16-rounded values, multiplied in fp32, give the
            # GPU's result up to the summation order.
            acc = tl.dot(xt.to(tl.float32), cast_to(w, xt.dtype, SOFT_BF16).to(tl.float32), acc,
                         input_precision="ieee")
        else:
            acc = tl.dot(xt, w.to(xt.dtype), acc)
    epilogue(acc, out, ws, bias, offs_m, offs_n, M, N, pid_s, SPLIT, HAS_BIAS, SOFT_BF16)
