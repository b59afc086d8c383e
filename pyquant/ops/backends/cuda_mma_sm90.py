"""``cuda_int4mma_qmatmul_sm90``: IntMMA weights at prefill sizes (M > 64) on
Hopper, through CUTLASS's mixed-input GEMM (``csrc/cuda/int4mma_sm90.cu``).

It reads the weight's codes as stored (IntMMA's layout is a CuTe layout the
collective takes directly); what CUTLASS wants in another form is small and
made once per weight and activation dtype by the launch plan:

* scales in natural row order, (G, Np), in x's dtype (IntMMA interleaves rows
  i and i + 8 of each 16-row block for its own kernel);
* the zero term ``z' = -s * z`` per group (CUTLASS computes ``s * q + z'``), in
  x's dtype; symmetric weights have z = 8. This rounds ``s * z`` once to x's
  dtype, where the spec rounds ``(q - z) * s``: a few ulps per weight, inside
  the matmul's tolerance.

Compute capability 9.0 only, an extension built with the CUTLASS headers,
fp16/bf16 x, N a multiple of 8, groups of 64 columns or more (or per-channel).
Other calls take the dequantize-then-GEMM path, as M > 64 did before.
Experimental until a GPU run passes it.
"""
from __future__ import annotations

import torch

from ... import _ext
from ...formats.int_mma import IntMMA, unpack_mma_scales
from .._dtypes import dtype_code, ptr
from ..dispatch import register_kernel
from . import cuda_mma
from .cuda import _aligned16, _check_x, _index, _packed, _src, capability, cuda_ready, launch_on
from .reference import dequant_matmul

ENTRY = "int4mma_sm90_gemm_cuda"
MIN_M = cuda_mma.MAX_M + 1  # below, the Marlin-style kernel (int4_mma.cu) serves
TILE_K = 64  # the kernel's k tile: groups must be whole tiles
DTYPES = (torch.float16, torch.bfloat16)


def _group_ok(fmt) -> bool:
    return fmt.group_size == -1 or fmt.group_size % TILE_K == 0


def _ok(fmt, device, m):
    if not (isinstance(fmt, IntMMA) and m >= MIN_M and _group_ok(fmt) and cuda_ready(device)):
        return False
    if not hasattr(_ext.load(), ENTRY):
        return False
    return capability(_index(device)) == (9, 0)  # sm_90a code runs on 9.0 parts only


def cutlass_scales_zeros(t: dict, fmt: IntMMA, n: int, dtype: torch.dtype):
    """IntMMA's stored scales (and zeros) -> (scales, z') as the kernel reads them:
    (G, Np) in natural row order, ``dtype``, z' = -scale * zero point (8 for a
    symmetric weight); padding rows 0."""
    stored = t["scales"]
    np_ = stored.shape[1]
    s = unpack_mma_scales(stored, np_).to(torch.float32)  # (Np, G), natural order (padding rows 0)
    if fmt.symmetric:
        z = torch.full_like(s, 8.0)
    else:
        z = unpack_mma_scales(t["zeros"], np_).to(torch.float32)
    scales = s.to(dtype)
    zeros = (-(scales.to(torch.float32) * z)).to(dtype)  # the scale CUTLASS multiplies by, times z
    return scales.t().contiguous(), zeros.t().contiguous()


def plan(qdata, fmt, shape, device: torch.device, m: int):
    """Launch plan for one weight: the scale and zero tensors per activation
    dtype, made at the first call with that dtype and kept."""
    n, k = shape
    t = _packed(fmt, qdata, shape, device)
    qweight = _aligned16(t["qweight"])
    entry = getattr(_ext.load(), ENTRY)
    index = _index(device)
    per_dtype: dict = {}
    ws_sizes: dict = {}

    def run(x, bias):
        rows = x.shape[0]
        if x.dtype not in DTYPES or n % 8:
            return dequant_matmul(x, qdata, fmt, shape, bias)  # the dequantize kernel, then torch's GEMM
        out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
        if rows == 0:
            return out
        if x.dtype not in per_dtype:
            per_dtype[x.dtype] = cutlass_scales_zeros(t, fmt, n, x.dtype)
        scales, zeros = per_dtype[x.dtype]
        xk = cuda_mma._kernel_input(x, t)
        kx = xk.shape[1]
        group = kx if fmt.group_size == -1 else fmt.group_size
        b = None if bias is None else _aligned16(bias.to(torch.float32))
        code = dtype_code(x.dtype)
        key = (rows, kx, code)
        if key not in ws_sizes:  # CUTLASS's workspace depends on the shape only: asked once per shape
            ws_sizes[key] = _ext.load().int4mma_sm90_workspace_bytes(rows, n, kx, group, code)
        ws_bytes = ws_sizes[key]
        ws = torch.empty((ws_bytes,), dtype=torch.uint8, device=x.device) if ws_bytes else None
        launch_on(index, entry, ptr(xk), ptr(qweight), ptr(scales), ptr(zeros), ptr(b), ptr(out), ptr(ws), ws_bytes,
                  rows, n, kx, group, code)
        return out

    run.keep = (qweight, per_dtype)
    return run


@register_kernel("qmatmul", "cuda", "int4mma", _ok, tag="sm90", plan=plan,
                 sources=_src("int4mma_sm90.cu"))
def int4mma_sm90(x, qdata, fmt, shape, bias):
    """x (M, K) fp16/bf16 contiguous, M > 64 -> (M, N) in x.dtype."""
    _check_x(x, shape[1], bias)
    return plan(qdata, fmt, shape, x.device, x.shape[0])(x, None if bias is None else bias.contiguous())
