"""Large-M CPU qmatmul: decoded panels of weight rows, each through torch's GEMM.

Used where the C++ kernels measured slower than torch's GEMM: GGUF's exact fp32
products from a few hundred rows of x below the avx512 level (at it, the
outer-product tile runs 1.8-2.3x dense fp32 at M = 512-2048), the Int and NF4
exact products at the avx2 / avxvnni levels from a few hundred rows (below
that their ymm tiles lead or tie; at avx512 the zmm tile leads at every M),
bf16 LoRA forwards (bf16 GEMMs), and every compute-bound product where the C++
kernels run at the scalar level (another architecture, or a forced level:
torch's GEMM has NEON and the like). The weight is decoded ``rows`` rows at a time (16 MiB of fp32 and
a quarter of the rows at most), never whole. Panels are few because each one is
two parallel regions (the decode, then the GEMM) and a GEMM of few columns
splits badly over threads: with another busy process on a 2-core machine, 4096
x 4096 Int4 at M = 256 ran at 0.58x dense fp32 with 4 MiB panels (16 of them)
and 0.95x with 16 MiB (4) (measured when Int's exact path used panels). At M >=
256 the GEMM's own packing, not the panel's cache residency, decides its speed.
Bias and the low-rank epilogue ride in each panel's GEMM (``addmm``'s input),
not in a second pass over y.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ... import _ext

PANEL_FLOATS = 1 << 22
# From this many rows of x on, products at the scalar level go to torch's GEMM:
# the point where the AVX2 kernels lost to it before they blocked x for L2 (a
# scalar kernel loses sooner; not measured separately).
SCALAR_PANEL_MIN_M = 256
# From this many rows on, the Int and NF4 exact products at the avx2 and
# avxvnni levels go there too. On Zen 3 (Int4 g128 and NF4, 4096 x 4096,
# 576 x 1536 and 1536 x 576, one and two threads, same process) these panels
# ran 1.04-1.44x the ymm tiles at M = 384-1024 in all but one of 32 cases
# (0.95x: Int4, 4096 x 4096, M = 1024, two threads; 1.10x in a rerun) and
# 1.02-1.40x at 2048-4096; at 256 the two were mixed (Int4 0.86-1.20x), at 128
# the tile led (0.68-0.93x at 4096 x 4096). What slows the tile there was not isolated:
# K blocks sized to half the L2 did not change it.
YMM_PANEL_MIN_M = 384


def vector_gemms() -> bool:
    """Whether the C++ kernels run at a vector level (AVX2 and up) now."""
    ext = _ext.load()
    return ext is not None and ext.simd_level() != "scalar"


def torch_gemm_panels(m: int) -> bool:
    """Whether an exact (fp32) product of m rows of x with an Int or NF4 weight
    goes to decoded panels through torch's GEMM at the SIMD level in effect,
    not to the C++ GEMM."""
    ext = _ext.load()
    level = "scalar" if ext is None else ext.simd_level()
    if level == "avx512":
        return False
    if level == "scalar":
        return m >= SCALAR_PANEL_MIN_M
    return m >= YMM_PANEL_MIN_M


def outer_product_tiles() -> bool:
    """Whether the C++ GEMMs run the avx512 outer-product tile now
    (csrc/cpu/panel_gemm.h), which stays ahead of torch's fp32 GEMM at any M."""
    ext = _ext.load()
    return ext is not None and ext.simd_level() == "avx512"


def panel_rows(n: int, k: int, floats: Optional[int] = None) -> int:
    """Rows per panel: at most ``floats`` (default PANEL_FLOATS) fp32 values and a quarter
    of the weight's rows (a panel is never the whole weight, however small the layer),
    at least one."""
    return max(1, min((floats or PANEL_FLOATS) // max(k, 1), -(-n // 4)))


def panel_matmul(x: torch.Tensor, n: int, k: int, decode: Callable[[int, int, torch.Tensor], None],
                 bias: Optional[torch.Tensor] = None, lora_xa: Optional[torch.Tensor] = None,
                 lora_b: Optional[torch.Tensor] = None, lora_scale: float = 0.0,
                 rows: Optional[int] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y (M, N) in ``dtype`` = x (M, K) @ W.T (+ bias) (+ lora_scale * lora_xa @ lora_b.T),
    every GEMM in ``dtype`` (bf16 multiplies in bf16, as a bf16 dense layer would);
    ``decode(n0, n1, out)`` writes rows [n0, n1) of W into ``out`` ((n1 - n0, K) fp32).
    Each panel's columns of y are written once, by one GEMM whose initial value is
    their low-rank term and bias."""
    rows = rows or panel_rows(n, k)
    xm = x.to(dtype).contiguous()
    xa = None if lora_xa is None else lora_xa.to(dtype)
    b = None if lora_b is None else lora_b.to(dtype)
    bias_m = None if bias is None else bias.to(dtype)
    h = min(rows, n)
    buf = torch.empty((h, k), dtype=torch.float32)
    low = None if dtype == torch.float32 else torch.empty((h, k), dtype=dtype)
    y = torch.empty((x.shape[0], n), dtype=dtype)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = buf[: n1 - n0]
        decode(n0, n1, w)
        if low is not None:
            w = low[: n1 - n0].copy_(w)
        init = None
        if xa is not None:
            init = torch.mm(xa, b[n0:n1].t()).mul_(lora_scale)
        if bias_m is not None:
            init = bias_m[n0:n1] if init is None else init.add_(bias_m[n0:n1])
        cols = y[:, n0:n1]  # BLAS writes the column block in place (ldc = N)
        if init is None:
            torch.mm(xm, w.t(), out=cols)
        else:
            torch.addmm(init, xm, w.t(), out=cols)
    return y
