"""GPTQ's in-block column update fused in Triton (experimental until a GPU run verifies it).

Spec: ``pyquant/algorithms/gptq.py::gptq_block_update_reference``. Rows of the
block W (N x B) are independent (own scales, own error feedback), so one
program owns ``BLOCK_N`` rows and the whole block width in registers, walks the
columns in order and touches global memory only to read each Hinv row (shared
by every program, L2-resident), the rows' scales/zeros, and to write each code
and error once; the torch loop instead pays ~8 launches and a full pass over
the block per column.

Column ``i`` is taken out of the register tile with a masked row sum: the other
terms are exactly 0, so the sum is exact (up to the sign of a zero weight,
which changes neither the code nor the error's magnitude).

Arithmetic follows the spec: IEEE division (``div_rn``), round half to even,
the quantization steps rounded one by one (``enable_fp_fusion=False`` on a
GPU) and the update as one fused multiply-add ``w - e * h``, which is what
torch's ``addr_`` kernel and the C++ CPU kernel compute. Runs on CPU tensors
under ``TRITON_INTERPRET=1`` (the interpreter's fma is a true fma too).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .ieee import div, exact_options, rint


@triton.jit
def _gptq_block_kernel(
    W, HINV, SCALE, ZERO, CODES, ERR,
    n, b, start, stop, group_len, maxq,
    s_wn, s_wb, s_hi, s_hj, s_sn, s_sg, s_zn, s_zg, s_cn, s_ck, s_en, s_ek,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_B)
    cmask = cols < b
    tile_mask = rmask[:, None] & cmask[None, :]
    w_ptrs = W + rows64[:, None] * s_wn + cols[None, :] * s_wb
    w = tl.load(w_ptrs, mask=tile_mask, other=0.0)
    zero_rows = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(start, stop):
        g = (i - start) // group_len
        s = tl.load(SCALE + rows64 * s_sn + g * s_sg, mask=rmask, other=1.0)
        z = tl.load(ZERO + rows64 * s_zn + g * s_zg, mask=rmask, other=0.0)
        wi = tl.sum(tl.where(cols[None, :] == i, w, 0.0), axis=1)
        q = tl.minimum(tl.maximum(rint(div(wi, s)) + z, 0.0), maxq)
        dq = (q - z) * s
        d = tl.load(HINV + i * s_hi + i * s_hj)
        e = div(wi - dq, d + zero_rows)
        later = (cols > i) & cmask
        h = tl.load(HINV + i * s_hi + cols * s_hj, mask=later, other=0.0)
        # Only columns > i change: a where (not h = 0 elsewhere) keeps the
        # others bit-identical even when e is huge.
        w = tl.where(later[None, :], tl.fma(-e[:, None], h[None, :], w), w)
        tl.store(CODES + rows64 * s_cn + (i - start) * s_ck, q.to(tl.uint8), mask=rmask)
        tl.store(ERR + rows64 * s_en + (i - start) * s_ek, e, mask=rmask)
    tl.store(w_ptrs, w, mask=tile_mask)


def default_block_n(n: int, b: int, interpreting: bool) -> int:
    """Rows per program: on a GPU ~1K fp32 of W per program (8 rows of a
    128-column block: 512 programs for N = 4096). The column walk is a latency
    chain, so more, smaller programs win: on an H100, W (4096, 128) took
    0.152 / 0.164 / 0.187 / 0.235 ms at 8 / 16 / 32 / 64 rows
    (benchmarks/bench_gptq_gpu.py). The interpreter pays per program, so it
    takes up to 64 rows at once."""
    block_b = triton.next_power_of_2(max(b, 1))
    if interpreting:
        return max(1, min(64, triton.next_power_of_2(max(n, 1))))
    return max(1, min(64, 1024 // block_b, triton.next_power_of_2(max(n, 1))))


def gptq_block_update(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out,
                      block_n=None, num_warps=None):
    """Same contract as the reference (validated by the caller): updates ``W``
    (N, B) fp32 in place and writes ``codes_out``/``err_out`` (N, stop - start);
    any strides. ``block_n`` (rows per program) and ``num_warps`` override the
    launch shape (tests, benchmarks)."""
    n, b = W.shape
    if n == 0 or stop <= start:
        return
    if block_n is None:
        block_n = default_block_n(n, b, type(_gptq_block_kernel).__name__ == "InterpretedFunction")
    block_b = triton.next_power_of_2(b)
    if num_warps is None:
        num_warps = 4 if block_n * block_b <= 4096 else 8
    grid = (triton.cdiv(n, block_n),)
    _gptq_block_kernel[grid](
        W, Hinv, scale, zero, codes_out, err_out,
        n, b, start, stop, group_len, float(maxq),
        W.stride(0), W.stride(1), Hinv.stride(0), Hinv.stride(1), scale.stride(0), scale.stride(1),
        zero.stride(0), zero.stride(1), codes_out.stride(0), codes_out.stride(1), err_out.stride(0),
        err_out.stride(1),
        BLOCK_N=block_n, BLOCK_B=block_b, num_warps=num_warps, **exact_options(_gptq_block_kernel, W.device),
    )
