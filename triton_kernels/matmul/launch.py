"""Host side of the matmul and dequantize kernels: config lookup, launches.

Nothing here synchronises with the device: sizes come from shapes, configs from
Python tables or the tuning cache (a host file read once), workspaces are
allocated with sizes fixed by shape and config. That keeps the launches legal
inside CUDA-graph capture (after a first eager call has created the small
per-device NF4 tables) and opaque-but-harmless under torch.compile, which sees
the pyquant custom op as a single node.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch
import triton

from ..tuning import autotune
from ..tuning.cache import get_cache
from ..tuning.configs import Config, cache_key, candidates, default_config, gemv_bm, path_for_m, resolve_split
from .args import (
    DTYPE_NAMES,
    format_args,
    gemv_packed_args,
    mm_bk,
    packed_gemv,
    packed_int,
    packed_path,
    scale_weights,
    uniform_groups,
    x16_mode,
)
from .dequant import dequant_kernel
from .epilogue import reduce_kernel
from .gemv import gemv_kernel
from .gemv_packed import gemv_packed_kernel
from .mm import mm_kernel
from .mm_packed import mm_int_kernel

_TRUE = ("1", "true", "on", "yes")
REDUCE_BLOCK = 1024


def interpreting() -> bool:
    """Were the kernels built for Triton's CPU interpreter (TRITON_INTERPRET=1)?"""
    return type(dequant_kernel).__name__ == "InterpretedFunction"


def autotune_enabled() -> bool:
    return os.environ.get("PYQUANT_AUTOTUNE", "").strip().lower() in _TRUE


# --- per-device constants -----------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs are plenty
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def gpu_name(device: torch.device) -> str:
    return _gpu_name(device.index if device.index is not None else torch.cuda.current_device())


# --- configs ------------------------------------------------------------------
def _usable(path: str, cfg: Config, packed: bool = False) -> bool:
    if path in ("splitk", "gemm"):
        return cfg.BM >= 16 and cfg.BN >= 16 and cfg.BK >= 16
    if path == "gemv" and packed:
        return cfg.BN >= 1 and cfg.BK >= 32  # whole 32-code chunks
    return cfg.BN >= 1 and cfg.BK >= 1


def get_config(path: str, fmt, x_dtype: Optional[torch.dtype], n: int, k: int, m: int, device, qdata=None) -> Config:
    """Tuned config from the per-GPU cache, else (optionally tuning first) the default."""
    packed = packed_path(path, fmt, k)
    default = default_config(path, m, packed)
    if device.type != "cuda" or interpreting():
        return default
    cache = get_cache(gpu_name(device))
    key = cache_key(path, fmt.spec(), DTYPE_NAMES.get(x_dtype, "none"), n, k, m)
    cfg = cache.get(key)
    if cfg is not None and _usable(path, cfg, packed):
        return cfg
    if qdata is not None and autotune_enabled() and not torch.cuda.is_current_stream_capturing():
        cfg = autotune.tune_key(key, *tuning_job(path, fmt, x_dtype, n, k, m, qdata), cache)
        if cfg is not None:
            return cfg
    return default


def tuning_job(path: str, fmt, x_dtype: Optional[torch.dtype], n: int, k: int, m: int, qdata):
    """-> (candidate configs, launch(config)) that ``autotune.tune_key`` times for
    one (path, format, x dtype, N, K, M bucket) on ``qdata`` (the packed tensors)."""
    shape = (n, k)
    dtype = x_dtype or torch.float16
    if path == "dequant":
        return candidates(path, 0), lambda c: dequantize(qdata, fmt, shape, dtype, config=c)
    x = torch.randn((m, k), dtype=dtype, device=qdata[0].device)
    return (candidates(path, m, packed=packed_path(path, fmt, k)),
            lambda c: qmatmul(x, qdata, fmt, shape, None, path=path, config=c))


# --- launches -----------------------------------------------------------------
def dequantize(qdata, fmt, shape, dtype: torch.dtype, config: Optional[Config] = None) -> torch.Tensor:
    n, k = shape
    dev = qdata[0].device
    out = torch.empty((n, k), dtype=dtype, device=dev)
    ptrs, ints, (fid, c0, c1, c2), perm = format_args(fmt, qdata, shape)
    cfg = config or get_config("dequant", fmt, None, n, k, 0, dev, qdata)
    grid = (triton.cdiv(n, cfg.BN), triton.cdiv(k, cfg.BK))
    dequant_kernel[grid](
        out, perm if perm is not None else out, *ptrs, n, k, *ints,
        FMT=fid, C0=c0, C1=c1, C2=c2, UNIFORM=uniform_groups(fmt, k, cfg.BK), HAS_PERM=perm is not None,
        BN=cfg.BN, BK=cfg.BK,
        SOFT_BF16=dtype == torch.bfloat16 and interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False,  # bit-exact: no a*b+c -> fma contraction
    )
    return out


def qmatmul(
    x: torch.Tensor,
    qdata,
    fmt,
    shape,
    bias: Optional[torch.Tensor] = None,
    path: Optional[str] = None,
    config: Optional[Config] = None,
) -> torch.Tensor:
    """``x (M, K) contiguous @ W_hat.T (+ bias)`` -> ``(M, N)`` in x.dtype."""
    n, k = shape
    m = x.shape[0]
    dev = x.device
    out = torch.empty((m, n), dtype=x.dtype, device=dev)
    if m == 0:
        return out
    path = path or path_for_m(m)
    if path not in ("gemv", "splitk", "gemm"):
        raise ValueError(f"path must be 'gemv', 'splitk' or 'gemm', got {path!r}")
    cfg = config or get_config(path, fmt, x.dtype, n, k, m, dev, qdata)
    ptrs, ints, (fid, c0, c1, c2), perm = format_args(fmt, qdata, shape)
    if bias is not None:
        bias = bias.contiguous()
    soft_bf16 = x.dtype == torch.bfloat16 and interpreting()
    common = dict(FMT=fid, C0=c0, C1=c1, C2=c2, UNIFORM=uniform_groups(fmt, k, cfg.BK), HAS_PERM=perm is not None,
                  HAS_BIAS=bias is not None, SOFT_BF16=soft_bf16)
    if path == "gemv" and packed_gemv(fmt, k):
        bk = max(32, cfg.BK)
        bm = min(4, gemv_bm(m))
        tiles = triton.cdiv(n, cfg.BN)
        split, per = resolve_split(dataclasses.replace(cfg, BK=bk), tiles, k, sm_count(dev), waves=1)
        ws = torch.empty((split, m, n), dtype=torch.float32, device=dev) if split > 1 else out
        ptrs, ints, consts = gemv_packed_args(fmt, qdata, shape)
        gemv_packed_kernel[(tiles, split, triton.cdiv(m, bm))](
            x, out, ws, bias if bias is not None else out, perm if perm is not None else x, *ptrs, m, n, k, per,
            *ints, **consts, HAS_PERM=perm is not None, HAS_BIAS=bias is not None, BM=bm, BN=cfg.BN, BK=bk, SPLIT=split,
            X16=x16_mode(x, m, k), SOFT_BF16=soft_bf16, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    elif path == "gemv":
        bm = gemv_bm(m)
        tiles = triton.cdiv(n, cfg.BN)
        split, per = resolve_split(cfg, tiles, k, sm_count(dev))
        ws = torch.empty((split, m, n), dtype=torch.float32, device=dev) if split > 1 else out
        gemv_kernel[(tiles, split)](
            x, out, ws, bias if bias is not None else out, perm if perm is not None else x, *ptrs,
            m, n, k, per, *ints, **common, BM=bm, BN=cfg.BN, BK=cfg.BK, SPLIT=split,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        bm = cfg.BM or max(16, min(64, gemv_bm(m)))
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, cfg.BN)
        packed = packed_int(fmt)
        if packed:
            # whole chunks, and every K tile inside one scale group
            cfg = dataclasses.replace(cfg, BK=mm_bk(fmt, k, cfg.BK))
        if path == "gemm" and cfg.SPLIT == 0:
            split, per = 1, triton.cdiv(k, cfg.BK) * cfg.BK
        else:
            split, per = resolve_split(cfg, tiles, k, sm_count(dev))
        ws = torch.empty((split, m, n), dtype=torch.float32, device=dev) if split > 1 else out
        mm_common = dict(BM=bm, BN=cfg.BN, BK=cfg.BK, SPLIT=split, GROUP_M=cfg.GROUP_M,
                         X_F32=x.dtype == torch.float32, UPCAST_DOT=x.dtype == torch.bfloat16 and interpreting(),
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if packed:
            t = dict(zip(fmt.tensor_specs(shape), qdata))
            q, sc = t["qweight"], t["scales"]
            mm_int_kernel[(tiles, split)](
                x, out, ws, bias if bias is not None else out, perm if perm is not None else x, q, sc,
                t.get("zeros", sc), m, n, k, per, fmt.packed_row_bytes(k), fmt.num_groups(k),
                BITS=fmt.bits, HAS_ZERO=not fmt.symmetric, GSHIFT=c2, HAS_PERM=perm is not None,
                HAS_BIAS=bias is not None, SOFT_BF16=soft_bf16,
                SCALE_W=scale_weights(fmt, bm, cfg.BK), **mm_common,
            )
        else:
            mm_kernel[(tiles, split)](
                x, out, ws, bias if bias is not None else out, perm if perm is not None else x, *ptrs,
                m, n, k, per, *ints, **common, **mm_common,
            )
    if split > 1:
        reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)](
            ws, out, bias if bias is not None else out, m, n,
            SPLIT=split, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, SOFT_BF16=soft_bf16,
        )
    return out
