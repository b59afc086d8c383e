"""CPU C++ kernels for the nf4 formats: thin wrappers over pyquant._C.

The C++ side reads raw pointers, so everything it relies on is checked here:
tensor shapes and dtypes against the format (a ``Tensor[]`` can reach the op
without going through ``QuantizedWeight``), contiguity, and the device.

qmatmul, never the whole float weight: fused (decode into registers) at
small M, tiled above (decoded tiles, x in passes of 256 rows that stay in L2,
the outer-product tile of csrc/cpu/panel_gemm.h; at the avx512 level, 4096 x
4096, 2 threads, M = 128 to 2048: 2.1-2.2x torch's fp32 GEMM on the
dequantized weight, ymm tiles 1.02-1.06x, decoded row panels through that GEMM
0.95-1.02x); those panels from SCALAR_PANEL_MIN_M rows at the scalar level and
from YMM_PANEL_MIN_M at avx2 / avxvnni (cpu_panels.py). With int8 activations (``cpu_activations``: by
default for fp16 / bf16 x below the row count it gives for the SIMD level,
exact for fp32 x) and K a multiple of 32, the integer-dot kernel at every M
(x and the codebook each in two int8 planes, per 32-block).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _ext
from ...errors import DeviceError, ShapeError
from ...formats import NF4
from ...formats.base import named_packed
from .._dtypes import dtype_code, ptr
from ..dispatch import register_kernel
from ..plans import out_like
from ...formats.nf4 import dynamic_map
from . import cpu_activations
from .cpu_lowrank import lora_args
from .cpu_panels import panel_matmul, torch_gemm_panels


def _supports(fmt, device, m) -> bool:
    return isinstance(fmt, NF4) and torch.device(device).type == "cpu" and _ext.load() is not None


def _weight_args(qdata, fmt: NF4, shape):
    """Validated, contiguous packed tensors -> the pointer arguments of the C++ entry points."""
    t = named_packed(fmt, qdata, shape, torch.device("cpu"))
    if fmt.double_quant:
        dmap = dynamic_map()
        args = (ptr(t["qweight"]), 0, ptr(t["absmax_q"]), ptr(t["absmax_scale"]), ptr(t["absmax_offset"]), ptr(dmap))
        keep = (t, dmap)
    else:
        args = (ptr(t["qweight"]), ptr(t["absmax"]), 0, 0, 0, 0)
        keep = (t,)
    return args, keep


def row_decoder(args, fmt: NF4, shape):
    """decode(n0, n1, out): rows [n0, n1) of W into ``out`` ((n1 - n0, K) fp32), from
    :func:`_weight_args`' pointers (the caller keeps their tensors alive)."""
    n, k = shape
    ext, nthreads = _ext.load(), torch.get_num_threads()

    def decode(n0: int, n1: int, out: torch.Tensor) -> None:
        ext.nf4_dequantize(*args, n, k, fmt.block_size, ptr(out), nthreads, n0, n1)

    return decode


@register_kernel("dequantize", "cpu", "nf4", _supports)
def dequantize(qdata, fmt: NF4, shape, dtype: torch.dtype, out=None) -> torch.Tensor:
    n, k = shape
    args, keep = _weight_args(qdata, fmt, shape)
    direct = out is not None and dtype == torch.float32
    w = out if direct else torch.empty((n, k), dtype=torch.float32)
    _ext.load().nf4_dequantize(*args, n, k, fmt.block_size, ptr(w), torch.get_num_threads())
    del keep
    if direct:
        return out
    w = w if dtype == torch.float32 else w.to(dtype)
    return w if out is None else out.copy_(w)


dequantize.writes_out = True


def qmatmul_plan(qdata, fmt: NF4, shape, device: torch.device, m: int):
    """Launch plan of the fused and tiled kernels for one weight (ops/plans.py):
    the packed tensors checked and their pointers taken once, so a call only
    allocates y and launches. The checks were most of a small layer's call:
    ``QuantLinear`` at 16 x 576, M = 1, one thread, took 38 us a call through the
    full function and 22 with this plan. Panels (large M at avx2) and the
    low-rank epilogue take the full function."""
    n, k = shape
    args, keep = _weight_args(qdata, fmt, shape)
    ext = _ext.load()
    q8_fits, block = ext.nf4_q8_supported(k), fmt.block_size
    qlist = list(qdata)
    use_int8 = cpu_activations.use_int8

    def run(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:  # x (..., K), contiguous
        dtype, xs = x.dtype, x.shape
        rows = x.numel() // k
        int8 = q8_fits and use_int8("nf4", dtype, rows)
        if rows == 0 or (not int8 and torch_gemm_panels(rows)):
            return qmatmul(x.reshape(-1, k), qlist, fmt, shape, bias).reshape(*xs[:-1], n)
        xk = x if int8 else x.to(torch.float32)
        bf = None if bias is None else bias.to(torch.float32).contiguous()
        # y in x's dtype, rounded from the fp32 result by the C++ entry point (csrc/cpu/half_output.h)
        y = torch.empty(xs[0], n, dtype=dtype) if len(xs) == 2 else out_like(xs, n, dtype)
        ext.nf4_qmatmul(xk.data_ptr(), rows, *args, n, k, block, ptr(bf), y.data_ptr(), torch.get_num_threads(), -1,
                        0, 0, 0, 0.0, int8, dtype_code(xk.dtype), dtype_code(dtype))
        return y

    run.takes_nd = True

    run.keep = keep  # the tensors behind ``args``' pointers (a contiguous copy where qdata's was not)
    return run


@register_kernel("qmatmul", "cpu", "nf4", _supports, plan=qmatmul_plan)
def qmatmul(x2d: torch.Tensor, qdata, fmt: NF4, shape, bias, lora_xa=None, lora_b=None,
            lora_scale: float = 0.0) -> torch.Tensor:
    """``x @ W.T + bias``; with ``lora_xa`` (M, r) = x @ A.T and ``lora_b`` (N, r),
    both fp32, plus ``lora_scale * lora_xa @ lora_b.T``, added by the kernel to
    each tile of y it writes (None or a zero scale: none)."""
    n, k = shape
    if x2d.dim() != 2 or x2d.shape[1] != k:
        raise ShapeError(f"x must be (M, {k}), got {tuple(x2d.shape)}")
    if x2d.device.type != "cpu":
        raise DeviceError(f"NF4 CPU kernel got x on {x2d.device}")
    args, keep = _weight_args(qdata, fmt, shape)
    m = x2d.shape[0]
    bf = None
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ShapeError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        bf = bias.to(torch.float32).contiguous()
    xa, b, rank, scale = lora_args(lora_xa, lora_b, lora_scale, m, n)
    nthreads = torch.get_num_threads()
    ext = _ext.load()
    int8 = cpu_activations.use_int8("nf4", x2d.dtype, m) and ext.nf4_q8_supported(k)
    # (``keep``, the tensors behind ``args``' pointers, lives to the end of this call)
    if not int8 and torch_gemm_panels(m):
        y = panel_matmul(x2d.to(torch.float32).contiguous(), n, k, row_decoder(args, fmt, shape), bf, xa, b, scale)
        return y if x2d.dtype == torch.float32 else y.to(x2d.dtype)
    xk = x2d.contiguous() if int8 else x2d.to(torch.float32).contiguous()
    y = torch.empty((m, n), dtype=x2d.dtype)  # rounded from the fp32 result in C++ (half_output.h)
    if m:
        ext.nf4_qmatmul(ptr(xk), m, *args, n, k, fmt.block_size, ptr(bf), ptr(y), nthreads, -1, ptr(xa), ptr(b), rank,
                        scale, int8, dtype_code(xk.dtype), dtype_code(y.dtype))
    return y
