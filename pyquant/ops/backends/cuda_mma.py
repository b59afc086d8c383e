"""CUDA kernels on the mma-layout int4 format (IntMMA).

``cuda_int4mma_qmatmul`` (csrc/cuda/int4_mma.cu): weight-only int4 on tensor
cores for M <= 64 activation rows, fp16/bf16 activations and fp16/bf16 scales.
``cuda_int4mma_dequantize`` (csrc/cuda/int4_mma_dequant.cu): the weight in
full, for the dequantize-then-GEMM path of larger M. Experimental until a GPU
run lists them in verified_kernels.json: reachable with ``kernel="cuda"`` on an
IntMMA weight (``pyquant.formats.to_mma``).

The launch shape lives here as plain functions (tested on the CPU): the
column-block width the kernel uses for an M, and how many K splits keep every
SM busy.
"""
from __future__ import annotations

import functools
import math

import torch

from ...formats.int_mma import IntMMA
from .._dtypes import dtype_code, ptr
from ..dispatch import register_kernel
from .cuda import _aligned16, _dequant_out, _matmul_out, _opt_code, _src, cuda_ready, launch

MAX_M = 64
MAX_M_GROUP32 = 32  # 64 rows x group 32 needs more than 255 registers per thread
STAGE_K = 128  # kStageK of int4_mma.cu: K is split on whole stages
MIN_BLOCK_N = 64  # the narrowest column block (M > 32): tickets per column of N
CTAS_PER_SM = 2  # grid target: about what fits on an SM at once (shared memory: 2-3 CTAs)
MIN_STAGES_PER_SPLIT = 2  # a split streams at least this many 128-deep stages
WORKSPACE_BYTES = 4 << 20  # split-K partials stay within L2


def block_n(m: int, group: int) -> int:
    """Output rows per CTA (Cfg<MT, FP>::kBlockN): 64 * n16 tiles per warp."""
    mt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    steps = 2 if group == 32 else 4 if group == 64 else 8
    wide = steps >= 4  # groups of 64+: fewer scale copies and registers per tile
    tiles_per_warp = (4 if wide else 2) if mt <= 2 else (2 if wide else 1) if mt == 4 else 1
    return 4 * 16 * tiles_per_warp


def plan_splits(m: int, n: int, k: int, group: int, sm_count: int) -> int:
    """K splits for an (M, N, K) call: about CTAS_PER_SM CTAs per SM, at least
    MIN_STAGES_PER_SPLIT stages per split, partials within WORKSPACE_BYTES, and
    a count the kernel accepts (no empty split). A first guess from the
    kernel's shape; the GPU benchmark is what tunes CTAS_PER_SM."""
    stages = math.ceil(k / STAGE_K)
    blocks = math.ceil(n / block_n(m, group))
    splits = max(1, min(stages // MIN_STAGES_PER_SPLIT, round(CTAS_PER_SM * sm_count / blocks)))
    splits = max(1, min(splits, WORKSPACE_BYTES // max(1, 4 * m * n)))
    per_split = math.ceil(stages / splits)
    return math.ceil(stages / per_split)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _mma_ok(fmt, device, m):
    return (
        isinstance(fmt, IntMMA)
        and fmt.scale_dtype in (torch.float16, torch.bfloat16)
        and 0 <= m <= (MAX_M_GROUP32 if fmt.group_size == 32 else MAX_M)
        and cuda_ready(device)
    )


def _kernel_input(x: torch.Tensor, t: dict) -> torch.Tensor:
    """x as the kernel reads it: act-order columns gathered, rows 16-byte aligned
    (K padded with zeros to a multiple of 8; the layout's padding codes meet them)."""
    if "perm" in t:
        x = x.index_select(1, t["perm"])
    k = x.shape[1]
    if k % 8 or x.data_ptr() % 16:
        x = torch.nn.functional.pad(x, (0, (-k) % 8))
    return x


@register_kernel("qmatmul", "cuda", "int4mma", _mma_ok, sources=_src("int4_mma.cu"))
def int4_mma(x, qdata, fmt, shape, bias):
    """x (M, K) fp16/bf16 contiguous, M <= 64 -> (M, N) in x.dtype. fp32 x
    takes the dequantize-then-matmul path (tensor cores take 16-bit inputs)."""
    n, k = shape
    t, out, bias = _matmul_out(x, qdata, fmt, shape, bias)
    m = x.shape[0]
    if m == 0:
        return out
    if x.dtype == torch.float32:
        from .reference import dequant_matmul

        return dequant_matmul(x, qdata, fmt, shape, bias)
    xk = _kernel_input(x, t)
    group = fmt.group_size_for(k) if fmt.group_size != -1 else -1
    splits = plan_splits(m, n, xk.shape[1], group, _sm_count(x.device.index or 0))
    ws = tickets = None
    if splits > 1:
        ws = torch.empty(splits * m * n, dtype=torch.float32, device=x.device)
        tickets = torch.zeros(math.ceil(n / MIN_BLOCK_N), dtype=torch.int32, device=x.device)
    qweight, scales = _aligned16(t["qweight"]), _aligned16(t["scales"])
    zeros = None if t.get("zeros") is None else _aligned16(t["zeros"])
    launch(
        x.device, "int4_mma_cuda",
        ptr(xk), ptr(qweight), ptr(scales), ptr(zeros), ptr(bias), ptr(out), ptr(ws), ptr(tickets),
        m, n, xk.shape[1], group, splits, dtype_code(fmt.scale_dtype), _opt_code(bias), dtype_code(x.dtype),
    )
    return out


def _mma_dequant_ok(fmt, device, m):
    return isinstance(fmt, IntMMA) and cuda_ready(device)


@register_kernel("dequantize", "cuda", "int4mma", _mma_dequant_ok, sources=_src("int4_mma_dequant.cu"))
def int4_mma_dequantize(qdata, fmt, shape, dtype):
    n, k = shape
    t, out = _dequant_out(qdata, fmt, shape, dtype)
    qweight = _aligned16(t["qweight"])  # 128-bit lane slots; held until the launch is enqueued
    launch(
        out.device, "int4_mma_dequant_cuda",
        ptr(qweight), ptr(t["scales"]), ptr(t.get("zeros")), ptr(t.get("perm")), ptr(out), n, k, fmt.group_size,
        dtype_code(fmt.scale_dtype), dtype_code(dtype),
    )
    return out
