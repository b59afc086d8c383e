"""Tile order and activation tiles shared by the generic kernels."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` of a tensor-core matmul in grouped order:
    GROUP_M row-tiles walk the same weight columns together, so they hit L2."""
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def x_tile(x, perm, mm, kk, M, K, HAS_PERM: tl.constexpr):
    """x[mm, kk] in x's dtype, 0 outside (M, K); with HAS_PERM the weight's stored
    column kk multiplies x column perm[kk]."""
    if HAS_PERM:
        xcol = tl.load(perm + kk, mask=kk < K, other=0).to(tl.int64)
    else:
        xcol = kk
    return tl.load(x + mm * K + xcol, mask=(mm < M) & (kk < K), other=0.0)
