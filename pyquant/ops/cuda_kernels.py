"""CUDA C++ kernels (pyquant._C built with PYQUANT_CUDA). Experimental until a
GPU run lists them in verified_kernels.json: reachable with kernel="cuda".

Every wrapper allocates its outputs with torch (sizes fixed by the shapes, so
CUDA-graph capture works), launches on torch's current stream of the tensors'
device, and never synchronizes. Kernel names are stable: verified_kernels.json,
the GPU tests (``test_<kernel name>_*``) and the benchmarks refer to them.
"""
from __future__ import annotations

import torch

from .. import _ext
from ._dtypes import dtype_code, ptr
from .dispatch import register_kernel
from .reference import is_w8a8_format

GEMV_MAX_M = 8  # the INT4 GEMV serves M in [0, 8]; larger M belongs to a GEMM


def _cuda_ready(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    ext = _ext.load()
    return ext is not None and ext.cuda_compiled()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous with a 16-byte aligned start (vector loads / cp.async need it).

    Tensors from torch's allocator are aligned; a view at an odd offset (a
    slice of a bigger buffer) is copied once into a fresh allocation.
    """
    t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


def _opt_code(t) -> int:
    return 0 if t is None else dtype_code(t.dtype)


# --- Int: dequantize ---------------------------------------------------------
def _int_any(fmt, device, m):
    return fmt.family == "int" and not fmt.act_order and _cuda_ready(device)


@register_kernel("dequantize", "cuda", "cuda_int_dequantize", _int_any)
def int_dequantize(qdata, fmt, shape, dtype):
    n, k = shape
    t = dict(zip(fmt.tensor_specs(shape), qdata))
    dev = qdata[0].device
    out = torch.empty((n, k), dtype=dtype, device=dev)
    zeros = t.get("zeros")
    with torch.cuda.device(dev):
        _ext.load().int_dequant_cuda(
            ptr(t["qweight"].contiguous()), ptr(t["scales"].contiguous()),
            ptr(None if zeros is None else zeros.contiguous()), ptr(out), n, k, fmt.bits,
            fmt.group_size_for(k), dtype_code(fmt.scale_dtype), dtype_code(dtype), _stream(dev),
        )
    return out


# --- Int4: GEMV for M <= 8 -----------------------------------------------------
def _int4_gemv_ok(fmt, device, m):
    return (
        fmt.family == "int"
        and fmt.bits == 4
        and not fmt.act_order
        and 0 <= m <= GEMV_MAX_M
        and _cuda_ready(device)
    )


@register_kernel("qmatmul", "cuda", "cuda_int4_gemv", _int4_gemv_ok)
def int4_gemv(x, qdata, fmt, shape, bias):
    """x (M, K) fp16/bf16/fp32 contiguous, M <= 8 -> (M, N) in x.dtype."""
    n, k = shape
    m = x.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    t = dict(zip(fmt.tensor_specs(shape), qdata))
    zeros = t.get("zeros")
    if zeros is not None:
        zeros = zeros.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    with torch.cuda.device(x.device):
        _ext.load().int4_gemv_cuda(
            ptr(x), ptr(_aligned16(t["qweight"])), ptr(t["scales"].contiguous()), ptr(zeros), ptr(bias),
            ptr(out), m, n, k, fmt.group_size_for(k), dtype_code(fmt.scale_dtype), _opt_code(bias),
            dtype_code(x.dtype), _stream(x.device),
        )
    return out


# --- W8A8: per-token int8 activations x per-channel int8 weights --------------
def quantize_rows_int8_cuda(x: torch.Tensor, kp: int | None = None):
    """CUDA version of :func:`pyquant.ops.reference.quantize_rows_int8` for a
    contiguous 2-D ``x``: returns ``(q int8 (M, kp), scale fp32 (M,))`` with
    columns ``K..kp-1`` of ``q`` zero (``kp`` defaults to K rounded up to 32)."""
    m, k = x.shape
    if kp is None:
        kp = (k + 31) // 32 * 32
    q = torch.empty((m, kp), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        _ext.load().quantize_rows_int8_cuda(
            ptr(x.contiguous()), ptr(q), ptr(scale), m, k, kp, dtype_code(x.dtype), _stream(x.device)
        )
    return q, scale


def _w8a8_ok(fmt, device, m):
    return is_w8a8_format(fmt) and _cuda_ready(device)


@register_kernel("w8a8_matmul", "cuda", "cuda_w8a8_gemm", _w8a8_ok)
def w8a8_gemm(x, qdata, fmt, shape, bias):
    n, k = shape
    m = x.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    t = dict(zip(fmt.tensor_specs(shape), qdata))
    kp = fmt.packed_row_bytes(k)  # 8-bit codes: one byte per padded column
    qa, sa = quantize_rows_int8_cuda(x, kp)
    if bias is not None:
        bias = bias.contiguous()
    with torch.cuda.device(x.device):
        _ext.load().w8a8_gemm_cuda(
            ptr(qa), ptr(sa), ptr(_aligned16(t["qweight"])), ptr(t["scales"].contiguous()), ptr(bias), ptr(out),
            m, n, kp, dtype_code(fmt.scale_dtype), _opt_code(bias), dtype_code(out.dtype), _stream(x.device),
        )
    return out
