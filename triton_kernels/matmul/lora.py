"""QLoRA's two kernels, every format through ``decode.w_tile``.

* ``lora_kernel``: ``y = x @ W_hat.T + scale * xa @ B.T + bias``. The base
  product accumulates over K as in ``mm.py``; the low-rank term (``xa = x_lora @
  A.T``, r wide, computed by the caller) is one more small ``tl.dot`` on the
  same fp32 accumulator before the store, so y is written once.
* ``transposed_kernel``: ``out = g @ W_hat`` (the backward's grad_x), output
  tiles [BM, BK] reduced over N: the weight tile is decoded in [BN, BK]
  orientation (the same ``w_tile``, indices swapped), never written to memory.
  With act_order the stored column kk is stored to logical column perm[kk].

No split-K: training runs these at large M, where the output tiles alone fill
the GPU.
"""
import triton
import triton.language as tl

from ..decode import cast_to, w_tile
from .epilogue import epilogue
from .tiles import grouped_tile, x_tile


@triton.jit
def _dot(acc, a, w, A_F32: tl.constexpr, UPCAST_DOT: tl.constexpr, SOFT_BF16: tl.constexpr):
    """acc + a @ w for an activation tile a and a decoded fp32 weight tile w."""
    if A_F32:
        return tl.dot(a, w, acc, input_precision="ieee")
    elif UPCAST_DOT:
        # the CPU interpreter multiplies bf16 operands as raw bits (see mm.py)
        return tl.dot(a.to(tl.float32), cast_to(w, a.dtype, SOFT_BF16).to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, w.to(a.dtype), acc)


@triton.jit
def lora_kernel(
    x, out, bias, perm, xa, lb, p0, p1, p2, p3, p4, p5, M, N, K, R, scale, i0, i1,
    FMT: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, UNIFORM: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    BR: tl.constexpr, GROUP_M: tl.constexpr, X_F32: tl.constexpr, UPCAST_DOT: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mm = offs_m[:, None].to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        xt = x_tile(x, perm, mm, offs_k[None, :], M, K, HAS_PERM)
        w = w_tile(p0, p1, p2, p3, p4, p5, offs_n[None, :], offs_k[:, None], k0, N, K, i0, i1,
                   FMT, C0, C1, C2, UNIFORM)
        acc = _dot(acc, xt, w, X_F32, UPCAST_DOT, SOFT_BF16)
    # epilogue: + scale * xa @ B.T, fp32 operands (r <= BR columns, zero past R)
    rr = tl.arange(0, BR)
    a = tl.load(xa + mm * R + rr[None, :], mask=(mm < M) & (rr[None, :] < R), other=0.0)
    b = tl.load(lb + offs_n[None, :].to(tl.int64) * R + rr[:, None], mask=(rr[:, None] < R) & (offs_n[None, :] < N),
                other=0.0)
    acc += scale * tl.dot(a, b, input_precision="ieee")
    epilogue(acc, out, out, bias, offs_m, offs_n, M, N, 0, 1, HAS_BIAS, SOFT_BF16)


@triton.jit
def transposed_kernel(
    g, out, perm, p0, p1, p2, p3, p4, p5, M, N, K, i0, i1,
    FMT: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, UNIFORM: tl.constexpr,
    HAS_PERM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    G_F32: tl.constexpr, UPCAST_DOT: tl.constexpr, SOFT_BF16: tl.constexpr,
):
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BM, BK, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    k0 = pid_k * BK
    kk = k0 + tl.arange(0, BK)[None, :]
    mm = offs_m[:, None].to(tl.int64)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        gt = tl.load(g + mm * N + offs_n[None, :], mask=(mm < M) & (offs_n[None, :] < N), other=0.0)
        w = w_tile(p0, p1, p2, p3, p4, p5, offs_n[:, None], kk, k0, N, K, i0, i1, FMT, C0, C1, C2, UNIFORM)
        acc = _dot(acc, gt, w, G_F32, UPCAST_DOT, SOFT_BF16)
    if HAS_PERM:
        col = tl.load(perm + kk, mask=kk < K, other=0).to(tl.int64)
    else:
        col = kk
    tl.store(out + mm * K + col, cast_to(acc, out.dtype.element_ty, SOFT_BF16), mask=(mm < M) & (kk < K))
