"""The Triton kernels: dequantize, GEMV, tensor-core matmul (split-K / GEMM), reduce.

Every kernel decodes weights with :func:`_tiles.w_tile`, so one kernel serves
all formats; the format is a set of constexprs (FMT, C0, C1, C2) that prunes the
decoder at compile time. Pointer/int arguments ``p0..p5, i0, i1`` are the
format's tensors and sizes (see ``_launch.format_args``).

Paths of ``y = x @ W.T``:

* GEMV (M <= 4): CUDA cores. A ``[BN, BK]`` weight tile is decoded once and
  multiplied with every activation row (a ``[BM, BN, BK]`` broadcast reduced
  over K). Memory bound, so the grid also splits K (SPLIT) when N alone gives
  too few programs to fill the GPU.
* split-K (M <= 64): ``tl.dot`` tiles with BM = 16..64, K cut into SPLIT
  ranges: few M rows mean few output tiles, and splitting K restores
  parallelism.
* GEMM (larger M): the same kernel with SPLIT = 1 and a grouped tile order
  (GROUP_M) so tiles sharing weight columns run together and hit L2.

Split partial sums go to an fp32 workspace ``[SPLIT, M, N]`` and are added in
a fixed order by ``_reduce_kernel``: no atomics, so results are deterministic
run to run, and the workspace size depends only on shapes and the config
(CUDA-graph friendly).
"""
import triton
import triton.language as tl

from ._tiles import cast_to, w_tile


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
def epilogue(acc, out, ws, bias, offs_m, offs_n, M, N, pid_s, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
             SOFT_BF16: tl.constexpr):
    """Stores an fp32 [BM, BN] tile: + bias, cast, into ``out`` (SPLIT 1), or raw
    into split ``pid_s`` of the workspace for ``reduce_kernel``."""
    mm = offs_m[:, None].to(tl.int64)
    nn = offs_n[None, :]
    mask = (mm < M) & (nn < N)
    if SPLIT == 1:
        if HAS_BIAS:
            acc = acc + tl.load(bias + nn, mask=nn < N, other=0.0).to(tl.float32)
        tl.store(out + mm * N + nn, cast_to(acc, out.dtype.element_ty, SOFT_BF16), mask=mask)
    else:
        tl.store(ws + (pid_s * M + mm) * N + nn, acc, mask=mask)


@triton.jit
def _x_tile(x, perm, mm, kk, M, K, HAS_PERM: tl.constexpr):
    """x[mm, kk] in x's dtype, 0 outside (M, K); with HAS_PERM the weight's stored
    column kk multiplies x column perm[kk]."""
    if HAS_PERM:
        xcol = tl.load(perm + kk, mask=kk < K, other=0).to(tl.int64)
    else:
        xcol = kk
    return tl.load(x + mm * K + xcol, mask=(mm < M) & (kk < K), other=0.0)


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
        xt = _x_tile(x, perm, mm, offs_k[None, :], M, K, HAS_PERM).to(tl.float32)
        acc += tl.sum(xt[:, None, :] * w[None, :, :], axis=2)
    epilogue(acc, out, ws, bias, offs_m, offs_n, M, N, pid_s, SPLIT, HAS_BIAS, SOFT_BF16)


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
        xt = _x_tile(x, perm, mm, offs_k[None, :], M, K, HAS_PERM)
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


@triton.jit
def reduce_kernel(ws, out, bias, M, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                  SOFT_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = M * N
    mask = offs < total
    acc = tl.load(ws + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(ws + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc = acc + tl.load(bias + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + offs, cast_to(acc, out.dtype.element_ty, SOFT_BF16), mask=mask)
