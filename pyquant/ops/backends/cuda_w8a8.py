"""CUDA C++ kernels of ``w8a8_matmul``: per-token int8 activations times
per-channel Int8 weights (codes with zero point 128).

Two kernels, the Hopper one registered first so that, once verified, default
dispatch prefers it where it runs:

* ``cuda_int8_w8a8_matmul_sm90``: CUTLASS int8 wgmma GEMM with the rescale in
  its epilogue (``csrc/cuda/w8a8_sm90.cu``), fed by the vectorized quantizer of
  ``quantize_rows_w8a8.cu``. Compute capability 9.0 only (an sm_90a build), and
  only in an extension built with the CUTLASS headers. Takes fp16/bf16 x and N a
  multiple of 8; other calls go to the next kernel.
* ``cuda_int8_w8a8_matmul``: the mma.sync kernel (``w8a8.cu``, sm_80+), any N,
  fp32 x too.

Both do the spec's integer and fp32 operations in its order
(``pyquant.ops.reference.w8a8_matmul_reference``), so their GPU tests compare
bit for bit; the Hopper kernel has not run on a GPU yet.
"""
from __future__ import annotations

import torch

from ... import _ext
from .._dtypes import dtype_code, ptr
from ..dispatch import register_kernel
from ..reference.w8a8 import is_w8a8_format, w8a8_matmul_reference
from .cuda import _aligned16, _index, _matmul_out, _opt_code, _src, capability, cuda_ready, launch

SM90_ENTRY = "w8a8_sm90_gemm_cuda"
SM90_OUT_DTYPES = (torch.float16, torch.bfloat16)
# Both kernels sum |q_x| <= 127 times |q_w - 128| <= 128 in int32: exact up to
# this many (padded) columns. Wider rows take the spec (float64 sums) instead
# of a silently wrapped sum.
MAX_KP = (2**31 - 1) // (127 * 128)


def quantize_rows_int8_cuda(x: torch.Tensor, kp: int | None = None):
    """CUDA version of :func:`pyquant.ops.reference.quantize_rows_int8` for a
    contiguous 2-D ``x``: returns ``(q int8 (M, kp), scale fp32 (M,))`` with
    columns ``K..kp-1`` of ``q`` zero (``kp`` defaults to K rounded up to 32)."""
    m, k = x.shape
    if kp is None:
        kp = (k + 31) // 32 * 32
    q = torch.empty((m, kp), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    x = x.contiguous()
    launch(x.device, "quantize_rows_int8_cuda", ptr(x), ptr(q), ptr(scale), m, k, kp, dtype_code(x.dtype))
    return q, scale


def quantize_rows_w8a8_cuda(x: torch.Tensor, kp: int | None = None):
    """:func:`quantize_rows_int8_cuda` plus ``corr`` int32 (M,) = 128 * the row
    sums of ``q``: the zero-point correction of the s8 x u8 Hopper GEMM."""
    m, k = x.shape
    if kp is None:
        kp = (k + 31) // 32 * 32
    q = torch.empty((m, kp), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    corr = torch.empty((m,), dtype=torch.int32, device=x.device)
    x = x.contiguous()
    launch(x.device, "quantize_rows_w8a8_cuda", ptr(x), ptr(q), ptr(scale), ptr(corr), m, k, kp,
           dtype_code(x.dtype))
    return q, scale, corr


def _has_sm90_gemm() -> bool:
    return hasattr(_ext.load(), SM90_ENTRY)


def _sm90_ok(fmt, device, m):
    if not (is_w8a8_format(fmt) and cuda_ready(device) and _has_sm90_gemm()):
        return False
    return capability(_index(device)) == (9, 0)  # sm_90a code runs on 9.0 parts only


def _w8a8_ok(fmt, device, m):
    return is_w8a8_format(fmt) and cuda_ready(device)


@register_kernel("w8a8_matmul", "cuda", "int8", _sm90_ok, tag="sm90",
                 sources=_src("w8a8_sm90.cu", "quantize_rows_w8a8.cu"))
def w8a8_sm90_gemm(x, qdata, fmt, shape, bias):
    n, k = shape
    if x.dtype not in SM90_OUT_DTYPES or n % 8 or fmt.packed_row_bytes(k) > MAX_KP:
        return w8a8_gemm(x, qdata, fmt, shape, bias)  # fp32 x, rows the TMA store cannot write, or K too wide
    t, out, bias = _matmul_out(x, qdata, fmt, shape, bias)
    m = x.shape[0]
    if m == 0:
        return out
    kp = fmt.packed_row_bytes(k)  # a multiple of 32: 16-byte TMA rows
    qa, sa, corr = quantize_rows_w8a8_cuda(x, kp)
    qweight = _aligned16(t["qweight"])
    sw = _aligned16(t["scales"].reshape(n).to(torch.float32))  # the epilogue reads fp32 vectors
    b = None if bias is None else _aligned16(bias.to(torch.float32))
    out_code = dtype_code(out.dtype)
    ws_bytes = _ext.load().w8a8_sm90_workspace_bytes(m, n, kp, out_code)
    ws = torch.empty((ws_bytes,), dtype=torch.uint8, device=x.device) if ws_bytes else None
    launch(x.device, SM90_ENTRY, ptr(qa), ptr(sa), ptr(corr), ptr(qweight), ptr(sw), ptr(b), ptr(out), ptr(ws),
           ws_bytes, m, n, kp, out_code)
    return out


@register_kernel("w8a8_matmul", "cuda", "int8", _w8a8_ok, sources=_src("w8a8.cu"))
def w8a8_gemm(x, qdata, fmt, shape, bias):
    n, k = shape
    kp = fmt.packed_row_bytes(k)  # 8-bit codes: one byte per padded column
    if kp > MAX_KP:
        return w8a8_matmul_reference(x, qdata, fmt, shape, bias)
    t, out, bias = _matmul_out(x, qdata, fmt, shape, bias)
    m = x.shape[0]
    if m == 0:
        return out
    qa, sa = quantize_rows_int8_cuda(x, kp)
    qweight = _aligned16(t["qweight"])
    launch(
        x.device, "w8a8_gemm_cuda",
        ptr(qa), ptr(sa), ptr(qweight), ptr(t["scales"]), ptr(bias), ptr(out),
        m, n, kp, dtype_code(fmt.scale_dtype), _opt_code(bias), dtype_code(out.dtype),
    )
    return out
