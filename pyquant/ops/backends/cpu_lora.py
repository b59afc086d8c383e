"""CPU kernels of the QLoRA ops: ``lora_qmatmul`` and ``qmatmul_transposed``.

``qmatmul_transposed`` (``g (M, N) @ W_hat``, the backward's grad_x), Int and
NF4: the C++ kernels (``csrc/cpu/{int,nf4}_transposed.cpp``,
``transposed_matmul.h``), which stream the packed weight once per 8 rows of g
up to 8 rows and, from 9, decode it once per 256 rows of g into L2 tiles for
an outer-product GEMM; neither holds more than a tile. In fp32 they beat
the column panels through torch's GEMM that ran from :data:`PANEL_MIN_M` rows
before (SmolLM2 and 4096 x 4096 shapes, M = 256 and 2048, 2 threads: 1.8-2.3x
torch.mm(g, W_hat) with zmm strips, the panels 0.82-0.97x). bf16 g
from PANEL_MIN_M rows, and any g where the C++ kernels run at the scalar
level, still take those panels: the C++ code decodes column panels of at most
:data:`PANEL_BYTES` (and at most a quarter of the weight) and each goes
through ``torch.mm`` (a bf16 GEMM for bf16) straight into its columns of the
output. GGUF: the same with row panels of the GGUF dequantize kernel.

``lora_qmatmul``: from :data:`FORWARD_PANEL_MIN_M` rows of x (training
batches) in bf16, Int and NF4, the weight is decoded in row panels by the C++
dequantize kernels and each panel's columns of y are computed once, by torch's
GEMM, starting from their low-rank term and bias:
``y[:, panel] = (bias + scale * xa @ B[panel].T) + x @ W_panel.T``. The
low-rank term is the accumulator's initial value, so it costs no pass over y of
its own, and bf16 activations multiply in bf16 (AVX512-BF16/AMX GEMMs where the
CPU has them, as a bf16 dense layer would; the C++ qmatmul kernels compute in
fp32). M = 2048, K = N = 4096, 2 threads, 2-core AMD EPYC with AVX512-BF16,
shared (timings noisy): Int4 bf16 312 ms vs 740 ms for the C++ qmatmul +
addmm_; NF4 bf16 724 vs 1744 ms. In fp32 the C++ GEMMs (x in L2-sized blocks,
the outer-product tile at the avx512 level) beat the panels: 4096 x 4096, M =
128 to 2048, 2 threads, 2.1-2.4x (Int4) and 2.1-2.2x (NF4) torch's fp32 GEMM,
the panels 0.95-1.02x.

Below that, and in fp32/fp16, the C++ qmatmul kernels
take the low-rank term in their epilogue (``csrc/cpu/lora_epilogue.h``: each
tile of y gets ``scale * xa @ B.T`` while it is in cache, no second pass over
y). GGUF's kernels have no epilogue: its qmatmul (exact fp32 activations, not
llama.cpp's int8 ones: a training forward is the product its backward
differentiates) is followed by one in-place ``addmm_`` of the low-rank term.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ... import _ext
from .._dtypes import ptr
from ..dispatch import register_kernel
from ..reference.lora import add_lowrank_
from . import cpu_activations, cpu_gguf, cpu_int, cpu_nf4
from .cpu_panels import panel_matmul, panel_rows, vector_gemms

# From this many rows of g on, decoded panels + torch.mm beat the streaming
# C++ kernel (K = N = 4096, one thread, CPU time; benchmarks/bench_lora.py
# --crossover): Int4 g64 7 vs 9 ms at M = 8, 13 vs 11 at 16, 24 vs 16 at 32;
# NF4 5 vs 7, 9 vs 10, 19 vs 15. Panels are now for bf16 g (and the scalar
# level): in fp32 the C++ kernel's tiled form takes over at 9 rows.
PANEL_MIN_M = 16
PANEL_BYTES = 8 << 20  # fp32 panel: 512 columns of a 4096-row weight


# --- lora_qmatmul -----------------------------------------------------------------
# From this many rows of bf16 x on, the forward goes through decoded row panels
# and torch's bf16 GEMM: compute-bound from there, and AVX512-BF16 multiplies
# twice the values per instruction of the C++ kernels' fp32 FMAs.
FORWARD_PANEL_MIN_M = 256
ROW_PANEL_FLOATS = 1 << 20  # fp32 values per row panel (4 MiB: 256 rows of K = 4096)


def _panel_forward(x, n: int, k: int, decode_rows: Callable, bias, xa, lora_B, scale: float) -> torch.Tensor:
    """``x (M, K) @ W_hat.T + scale * xa @ B.T + bias`` through row panels of W_hat
    (``cpu_panels.panel_matmul``)."""
    rows = panel_rows(n, k, ROW_PANEL_FLOATS)
    y = panel_matmul(x, n, k, decode_rows, bias, xa, lora_B, scale, rows=rows, dtype=_gemm_dtype(x.dtype))
    return y.to(x.dtype)


def _int_rows(qdata, fmt, shape):
    """(decode_rows, keep) of an Int weight: rows in logical column order (act_order's
    perm applied by the dequantize kernel), the packed tensors to keep alive."""
    t = cpu_int._named(fmt, qdata, shape)
    return cpu_int.row_decoder(t, fmt, shape[1], cpu_int._checked_perm(t, shape[1])), t


def _nf4_rows(qdata, fmt, shape):
    args, keep = cpu_nf4._weight_args(qdata, fmt, shape)
    return cpu_nf4.row_decoder(args, fmt, shape), keep


def _lowrank_kernel(base: Callable, rows: Optional[Callable] = None, dtypes=None, epilogue: bool = True
                    ) -> Callable:
    def kernel(x, qdata, fmt, shape, bias, xa, lora_B, scale):
        if rows is not None and x.shape[0] >= FORWARD_PANEL_MIN_M and (dtypes is None or x.dtype in dtypes):
            decode_rows, keep = rows(qdata, fmt, shape)
            y = _panel_forward(x, shape[0], shape[1], decode_rows, bias, xa, lora_B, scale)
            del keep
            return y
        if epilogue:  # the kernel adds the low-rank term to each tile of y it writes
            f32 = torch.float32
            return base(x, qdata, fmt, shape, bias, lora_xa=xa.to(f32).contiguous(),
                        lora_b=lora_B.to(f32).contiguous(), lora_scale=float(scale))
        # GGUF's CPU default multiplies int8-quantized x (llama.cpp's inference semantics); a training
        # forward stays the exact product its backward differentiates
        with cpu_activations.cpu_activations("fp32"):
            y = base(x, qdata, fmt, shape, bias)
        return add_lowrank_(y, xa, lora_B, scale)

    kernel.__name__ = f"{base.__module__.rsplit('.', 1)[-1]}_lora_qmatmul"
    return kernel


# bf16 only: in fp32 the C++ GEMMs measured faster than row panels
register_kernel("lora_qmatmul", "cpu", "int", cpu_int._supports)(
    _lowrank_kernel(cpu_int.qmatmul, _int_rows, (torch.bfloat16,)))
register_kernel("lora_qmatmul", "cpu", "nf4", cpu_nf4._supports)(
    _lowrank_kernel(cpu_nf4.qmatmul, _nf4_rows, (torch.bfloat16,)))
register_kernel("lora_qmatmul", "cpu", "gguf", cpu_gguf._supports)(_lowrank_kernel(cpu_gguf.qmatmul, epilogue=False))


# --- qmatmul_transposed -------------------------------------------------------------
def panel_extent(outer: int, inner: int, align: int) -> int:
    """How many of ``inner`` columns (or rows) a panel takes: at most
    PANEL_BYTES of fp32 with ``outer`` values each, at most a quarter of them
    (a panel is never the whole weight), a multiple of ``align``, at least one."""
    budget = max(1, PANEL_BYTES // (4 * outer))
    quarter = -(-inner // 4)
    cols = min(budget, quarter)
    return max(align, cols // align * align)


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 panels multiply in bf16 (AVX512-BF16 GEMMs, as a bf16 dense layer
    # would); fp16 CPU GEMMs are slow, so fp16 goes through fp32; fp64 (the
    # gradient checks) in fp64, as the reference does.
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32


def _transposed(g, n: int, k: int, align: int, run_kernel: Callable, decode_panel: Callable) -> torch.Tensor:
    """``g (M, N) @ W_hat`` -> (M, K) in g's dtype, in stored column order:
    ``run_kernel(g fp32, out fp32)`` below PANEL_MIN_M rows and, with vector
    C++ kernels, for any g but bf16 and fp64; else panels from
    ``decode_panel(k0, k1, out (N, k1 - k0) fp32)``."""
    m = g.shape[0]
    if g.dtype != torch.float64 and (m < PANEL_MIN_M or (g.dtype != torch.bfloat16 and vector_gemms())):
        gf = g.to(torch.float32).contiguous()
        out = torch.empty((m, k), dtype=torch.float32)
        if m:
            run_kernel(gf, out)
        return out.to(g.dtype)
    dtype = _gemm_dtype(g.dtype)
    gm = g.to(dtype)
    cols = panel_extent(n, k, align)
    out = torch.empty((m, k), dtype=dtype)
    buf = torch.empty(n * cols, dtype=torch.float32)
    low = None if dtype == torch.float32 else torch.empty(n * cols, dtype=dtype)
    for k0 in range(0, k, cols):
        w = min(cols, k - k0)
        panel = buf[: n * w].view(n, w)
        decode_panel(k0, k0 + w, panel)
        if low is not None:
            panel = low[: n * w].view(n, w).copy_(panel)
        torch.mm(gm, panel, out=out[:, k0:k0 + w])  # BLAS writes the column block in place (ldc = K)
    return out.to(g.dtype)


def _with_entry(supports: Callable, entry: str) -> Callable:
    """``supports``, and the loaded extension has ``entry`` (one built before
    these kernels existed leaves the op to the reference)."""
    def fn(fmt, device, m):
        return supports(fmt, device, m) and hasattr(_ext.load(), entry)

    return fn


@register_kernel("qmatmul_transposed", "cpu", "int", _with_entry(cpu_int._supports, "int_qmatmul_t"))
def int_qmatmul_transposed(g: torch.Tensor, qdata, fmt, shape) -> torch.Tensor:
    n, k = shape
    t = cpu_int._named(fmt, qdata, shape)
    perm = cpu_int._checked_perm(t, k)
    weight = cpu_int._weight_args(fmt, t, shape)
    C, threads = _ext.load(), torch.get_num_threads()
    out = _transposed(
        g, n, k, 32,
        lambda gf, o: C.int_qmatmul_t(ptr(gf), gf.shape[0], *weight, ptr(o), threads),
        lambda k0, k1, p: C.int_decode_panel(*weight, k0, k1, ptr(p), threads),
    )
    if perm is not None and perm.numel():
        # stored column j is logical column perm[j]: logical column c is stored
        # column argsort(perm)[c], a gather (index_select is 3x faster than the
        # scatter logical[:, perm] = out, 2.5x faster than out[:, inverse])
        out = out.index_select(1, torch.argsort(perm.long()))
    return out


@register_kernel("qmatmul_transposed", "cpu", "nf4", _with_entry(cpu_nf4._supports, "nf4_qmatmul_t"))
def nf4_qmatmul_transposed(g: torch.Tensor, qdata, fmt, shape) -> torch.Tensor:
    n, k = shape
    args, keep = cpu_nf4._weight_args(qdata, fmt, shape)
    C, threads, bs = _ext.load(), torch.get_num_threads(), fmt.block_size
    out = _transposed(
        g, n, k, 16,
        lambda gf, o: C.nf4_qmatmul_t(ptr(gf), gf.shape[0], *args, n, k, bs, ptr(o), threads),
        lambda k0, k1, p: C.nf4_decode_panel(*args, n, k, bs, k0, k1, ptr(p), threads),
    )
    del keep
    return out


@register_kernel("qmatmul_transposed", "cpu", "gguf", cpu_gguf._supports)
def gguf_qmatmul_transposed(g: torch.Tensor, qdata, fmt, shape) -> torch.Tensor:
    """Row panels (GGUF blocks never span rows): out += g[:, rows] @ panel."""
    n, k = shape
    blocks = cpu_gguf._blocks(qdata, fmt, shape)
    dtype = _gemm_dtype(g.dtype)
    gm = g.to(dtype)
    rows = panel_extent(k, n, 1)
    out = torch.zeros((g.shape[0], k), dtype=dtype)
    buf = torch.empty(rows * k, dtype=torch.float32)
    for n0 in range(0, n, rows):
        h = min(rows, n - n0)
        panel = cpu_gguf._dequantize_fp32(blocks[n0:n0 + h], fmt, h, k, out=buf[: h * k].view(h, k))
        out.addmm_(gm[:, n0:n0 + h], panel.to(dtype))
    return out.to(g.dtype)
