"""How a kernel's fp32 [BM, BN] result leaves it: + bias and cast into ``out``
(SPLIT 1), or raw into one split of the fp32 workspace, which ``reduce_kernel``
then adds in a fixed split order (no atomics: deterministic run to run)."""
import triton
import triton.language as tl

from ..decode import cast_to


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
