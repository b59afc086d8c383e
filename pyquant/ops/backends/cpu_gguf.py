"""CPU C++ kernels for the gguf formats: thin wrappers over pyquant._C.

The ops can be called with any ``Tensor[]``, so the blocks tensor is checked
against the format (``named_packed``) before the C++ code reads it; otherwise
we only adapt dtypes (the C++ kernels read and write fp32) and pass pointers.
Kernels:

* ``gguf_dequantize``: every block type, bit-exact with ``gguf.quants.dequantize``
  (fp32 out; other dtypes are a torch cast of it, i.e. correctly rounded).
* ``gguf_qmatmul``, by default (``cpu_activations`` "auto" or "int8"):
  llama.cpp's arithmetic at every M. x is quantized to Q8_0 / Q8_1 / Q8_K
  blocks once per call and multiplied block by block in integers at the SIMD
  level in effect (csrc/cpu/q8_*.cpp); it stays ahead of torch's fp32 GEMM at
  large M too (4096 x 4096, M = 512, one core: ~3x, the integer dot products
  doing 4x the work per instruction of fp32 FMAs).
* with ``cpu_activations("fp32")``, exact fp32, fused in C++ (a dedicated M=1
  kernel for Q4_K, Q6_K and Q8_0, a tiled decode-and-multiply kernel
  otherwise). At the avx512 level that holds at every M (4096 x 4096, 2
  threads, M = 512-2048: 1.8-2.3x torch's fp32 GEMM on the dequantized
  weight). Below it, from ``TORCH_MATMUL_MIN_M`` rows of x on, where torch's
  GEMM beats the ymm tiles, decoded panels of ``ROW_TILE`` rows each
  multiplied with torch (cpu_panels.py); memory stays at one panel, never the
  whole float weight.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ... import _ext
from ...formats.base import named_packed
from .._dtypes import DTYPE_CODES, dtype_code
from ..dispatch import register_kernel
from ..plans import out_like
from . import cpu_activations
from .cpu_panels import outer_product_tiles, panel_matmul

ROW_TILE = 256
TORCH_MATMUL_MIN_M = 512


def _blocks(qdata, fmt, shape) -> torch.Tensor:
    return named_packed(fmt, qdata, shape, torch.device("cpu"))["blocks"]


def _supports(fmt, device: torch.device, m: int) -> bool:
    if fmt.family != "gguf" or device.type != "cpu":
        return False
    ext = _ext.load()
    # hasattr: an extension built before these kernels existed leaves GGUF to the reference.
    return ext is not None and hasattr(ext, "gguf_qmatmul")


def _dequantize_fp32(blocks: torch.Tensor, fmt, n: int, k: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    bt = fmt.block
    if out is None:
        out = torch.empty((n, k), dtype=torch.float32)
    if out.numel():
        _ext.load().gguf_dequantize(bt.ggml_type, blocks.data_ptr(), out.data_ptr(), n * (k // bt.block_size),
                                    torch.get_num_threads())
    return out


@register_kernel("dequantize", "cpu", "gguf", _supports)
def dequantize(qdata: List[torch.Tensor], fmt, shape: Tuple[int, int], dtype: torch.dtype, out=None) -> torch.Tensor:
    n, k = shape
    blocks = _blocks(qdata, fmt, shape)
    if out is not None and dtype == torch.float32:
        return _dequantize_fp32(blocks, fmt, n, k, out)
    w = _dequantize_fp32(blocks, fmt, n, k)
    w = w if dtype == torch.float32 else w.to(dtype)
    return w if out is None else out.copy_(w)


dequantize.writes_out = True


def qmatmul_plan(qdata, fmt, shape, device: torch.device, m: int):
    """Launch plan of the int8 kernels for one weight (ops/plans.py): the blocks
    checked and the entry point bound once, so a call only allocates y and
    launches. On SmolLM2's 576-wide layers the C++ call is 6-16 us and the
    per-call checks were another 4; the exact mode takes the full function."""
    n, k = shape
    blocks = _blocks(qdata, fmt, shape)
    entry, ggml_type, blocks_ptr = _ext.load().gguf_qmatmul, fmt.block.ggml_type, blocks.data_ptr()
    qlist = list(qdata)
    mode, f32, codes, nthreads = cpu_activations.current, torch.float32, DTYPE_CODES, torch.get_num_threads

    # x (..., K), contiguous (takes_nd). Every name local, x's dtype and
    # shape read once: at SmolLM2's 576-wide layers this function's own work
    # is a tenth of the product.
    def run(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if mode() == "fp32":  # GGUF takes int8 activations in "auto" and "int8" (cpu_activations.use_int8)
            return qmatmul(x.reshape(-1, k), qlist, fmt, shape, bias).reshape(*x.shape[:-1], n)
        dtype, lead = x.dtype, x.shape
        # y in x's dtype, rounded from the fp32 result by the C++ entry point (csrc/cpu/half_output.h)
        y = torch.empty(lead[0], n, dtype=dtype) if len(lead) == 2 else out_like(lead, n, dtype)
        rows = x.numel() // k
        if rows:
            b = None if bias is None else bias.to(f32).contiguous()
            code = codes[dtype]
            entry(ggml_type, x.data_ptr(), blocks_ptr, 0 if b is None else b.data_ptr(), y.data_ptr(), rows, n, k,
                  nthreads(), True, code, code)
        return y

    run.takes_nd = True

    run.keep = blocks  # behind ``blocks_ptr`` (a contiguous copy where qdata's was not)
    return run


@register_kernel("qmatmul", "cpu", "gguf", _supports, plan=qmatmul_plan)
def qmatmul(
    x2d: torch.Tensor, qdata: List[torch.Tensor], fmt, shape: Tuple[int, int], bias: Optional[torch.Tensor]
) -> torch.Tensor:
    n, k = shape
    m = x2d.shape[0]
    b = None if bias is None else bias.to(torch.float32).contiguous()
    blocks = _blocks(qdata, fmt, shape)
    int8 = cpu_activations.use_int8("gguf", x2d.dtype)
    # int8 kernels read x in its own dtype; the exact ones want fp32
    x = x2d.contiguous() if int8 else x2d.to(torch.float32).contiguous()
    if m >= TORCH_MATMUL_MIN_M and not int8 and not outer_product_tiles():
        y = panel_matmul(x, n, k, lambda n0, n1, out: _dequantize_fp32(blocks[n0:n1], fmt, n1 - n0, k, out), b,
                         rows=ROW_TILE)
        return y if x2d.dtype == torch.float32 else y.to(x2d.dtype)
    y = torch.empty((m, n), dtype=x2d.dtype)  # rounded from the fp32 result in C++ (half_output.h)
    if y.numel():
        _ext.load().gguf_qmatmul(fmt.block.ggml_type, x.data_ptr(), blocks.data_ptr(), 0 if b is None else b.data_ptr(),
                                 y.data_ptr(), m, n, k, torch.get_num_threads(), int8, dtype_code(x.dtype),
                                 dtype_code(y.dtype))
    return y
