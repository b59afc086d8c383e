"""Host side of QLoRA's kernels (``lora.py``): fixed tile shapes (no tuning
yet; the kernels are experimental until a GPU run verifies them), launches
that never synchronise with the device."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .args import format_args, uniform_groups
from .launch import interpreting
from .lora import lora_kernel, transposed_kernel

BM, BN, BK, GROUP_M = 32, 32, 32, 8
NUM_WARPS, NUM_STAGES = 4, 2


def _dtype_flags(t: torch.Tensor) -> dict:
    soft = t.dtype == torch.bfloat16 and interpreting()
    return dict(UPCAST_DOT=soft, SOFT_BF16=soft)


def lora_qmatmul(x, qdata, fmt, shape, xa, lora_B, scale: float, bias: Optional[torch.Tensor] = None):
    """``x (M, K) @ W_hat.T + scale * xa (M, r) @ lora_B (N, r).T + bias`` -> (M, N) in x.dtype."""
    n, k = shape
    m, r = x.shape[0], xa.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    ptrs, ints, (fid, c0, c1, c2), perm = format_args(fmt, qdata, shape)
    if bias is not None:
        bias = bias.contiguous()
    # the epilogue's operands in fp32: r columns, a rounding the low-rank term does not need
    xa32 = xa.to(torch.float32).contiguous()
    b32 = lora_B.to(torch.float32).contiguous()
    grid = (triton.cdiv(m, BM) * triton.cdiv(n, BN),)
    lora_kernel[grid](
        x, out, bias if bias is not None else out, perm if perm is not None else x, xa32, b32, *ptrs,
        m, n, k, r, float(scale), *ints,
        FMT=fid, C0=c0, C1=c1, C2=c2, UNIFORM=uniform_groups(fmt, k, BK), HAS_PERM=perm is not None,
        HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=BK, BR=max(16, triton.next_power_of_2(r)), GROUP_M=GROUP_M,
        X_F32=x.dtype == torch.float32, **_dtype_flags(x), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


def qmatmul_transposed(g, qdata, fmt, shape):
    """``g (M, N) @ W_hat`` -> (M, K) in g.dtype, logical column order."""
    n, k = shape
    m = g.shape[0]
    out = torch.empty((m, k), dtype=g.dtype, device=g.device)
    if m == 0:
        return out
    ptrs, ints, (fid, c0, c1, c2), perm = format_args(fmt, qdata, shape)
    grid = (triton.cdiv(m, BM) * triton.cdiv(k, BK),)
    transposed_kernel[grid](
        g, out, perm if perm is not None else g, *ptrs, m, n, k, *ints,
        FMT=fid, C0=c0, C1=c1, C2=c2, UNIFORM=uniform_groups(fmt, k, BK), HAS_PERM=perm is not None,
        BM=BM, BN=BN, BK=BK, GROUP_M=GROUP_M, G_F32=g.dtype == torch.float32, **_dtype_flags(g),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out
