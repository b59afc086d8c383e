"""Host side: format arguments, config lookup, launches.

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
from typing import Dict, Optional, Tuple

import torch
import triton

from . import _kernels as K
from . import _packed as PK
from ._tiles import FMT_GGUF, FMT_INT, FMT_NF4
from .cache import get_cache
from .configs import (
    Config,
    cache_key,
    default_config,
    gemv_bm,
    path_for_m,
    resolve_split,
)

_TRUE = ("1", "true", "on", "yes")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
REDUCE_BLOCK = 1024


def interpreting() -> bool:
    """Were the kernels built for Triton's CPU interpreter (TRITON_INTERPRET=1)?"""
    return type(K.dequant_kernel).__name__ == "InterpretedFunction"


def autotune_enabled() -> bool:
    return os.environ.get("PYQUANT_AUTOTUNE", "").strip().lower() in _TRUE


# --- per-device constants -----------------------------------------------------
_TABLES: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}


def _nf4_tables(device: torch.device):
    """(NF4 codebook fp32 [16], signed dynamic map fp32 [256]) on ``device``."""
    key = str(device)
    t = _TABLES.get(key)
    if t is None:
        from pyquant.formats.nf4 import dynamic_map, nf4_codebook

        t = _TABLES[key] = (nf4_codebook(device), dynamic_map(device))
    return t


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


# --- formats ------------------------------------------------------------------
def format_args(fmt, qdata, shape):
    """-> (6 pointer tensors, 2 ints, (FMT, C0, C1, C2), perm or None) for ``w_tile``."""
    t = dict(zip(fmt.tensor_specs(shape), qdata))
    n, k = shape
    fam = fmt.family
    if fam == "int":
        q, s = t["qweight"], t["scales"]
        ptrs = (q, s, t.get("zeros", s), q, q, q)
        ints = (fmt.packed_row_bytes(k), fmt.num_groups(k))
        gshift = 0 if fmt.group_size == -1 else fmt.group_size.bit_length() - 1
        return ptrs, ints, (FMT_INT, fmt.bits, int(not fmt.symmetric), gshift), t.get("perm")
    if fam == "nf4":
        q = t["qweight"]
        cb, dmap = _nf4_tables(q.device)
        if fmt.double_quant:
            ptrs = (q, t["absmax_q"], t["absmax_scale"], t["absmax_offset"], cb, dmap)
        else:
            ptrs = (q, t["absmax"], q, q, cb, dmap)
        return ptrs, (0, 0), (FMT_NF4, fmt.block_size, int(fmt.double_quant), 0), None
    if fam == "gguf":
        b = t["blocks"]
        bt = fmt.block
        return (b,) * 6, (k // bt.block_size * bt.type_size, 0), (FMT_GGUF, bt.ggml_type, 0, 0), None
    raise NotImplementedError(f"no Triton decoder for format {fmt.spec()}")


def uniform_groups(fmt, k: int, bk: int) -> bool:
    """Does every BK-aligned K tile lie inside one scale group (Int) or one
    absmax block (NF4)? Then the kernels load one scale per row and tile."""
    if fmt.family == "int":
        return fmt.group_size == -1 or fmt.group_size % bk == 0
    if fmt.family == "nf4":
        return k % fmt.block_size == 0 and fmt.block_size % bk == 0
    return False


def packed_int(fmt) -> bool:
    """Int4 / Int8: the word-wise kernels of ``_packed`` (32-bit weight loads, per-chunk scales)."""
    return fmt.family == "int" and fmt.bits in (4, 8)


def packed_gemv(fmt, k: int) -> bool:
    """Formats the word-wise GEMV serves: Int4 / Int8, and NF4 when every row is a
    whole number of 32-code chunks (16-byte aligned) and of absmax blocks."""
    if fmt.family == "nf4":
        return k % 32 == 0 and k % fmt.block_size == 0
    return packed_int(fmt)


def _gemv_packed_args(fmt, qdata, shape):
    """-> (qweight, sc, zr, aux0, aux1, aux2), (row bytes, groups per row), constexprs
    of ``gemv_packed_kernel``."""
    n, k = shape
    t = dict(zip(fmt.tensor_specs(shape), qdata))
    q = t["qweight"]
    if fmt.family == "nf4":
        cb, dmap = _nf4_tables(q.device)
        bs = fmt.block_size
        if fmt.double_quant:
            am = (t["absmax_q"], t["absmax_scale"], t["absmax_offset"])
        else:
            am = (t["absmax"], q, q)
        consts = dict(BITS=4, HAS_ZERO=False, GSHIFT=bs.bit_length() - 1, NF4=True, DQ=fmt.double_quant)
        return (q, am[0], am[1], am[2], cb, dmap), (k // 2, k // bs), consts
    sc = t["scales"]
    gshift = 0 if fmt.group_size == -1 else fmt.group_size.bit_length() - 1
    consts = dict(BITS=fmt.bits, HAS_ZERO=not fmt.symmetric, GSHIFT=gshift, NF4=False, DQ=False)
    return (q, sc, t.get("zeros", sc), q, q, q), (fmt.packed_row_bytes(k), fmt.num_groups(k)), consts


def packed_path(path: str, fmt, k: int) -> bool:
    """Does ``path`` run a word-wise kernel for this format (its own configs)?"""
    if path == "gemv":
        return packed_gemv(fmt, k)
    return path in ("splitk", "gemm") and packed_int(fmt)


def mm_bk(fmt, k: int, bk: int) -> int:
    """BK of the word-wise tensor-core kernel: whole 32-code chunks, at least 32
    (two k16 MMA steps), and a divisor of the group size so that one scale per row
    covers the tile."""
    bk = max(32, bk)
    if fmt.group_size != -1:
        bk = min(bk, fmt.group_size)
    return bk


def scale_weights(fmt, bm: int, bk: int) -> bool:
    """Word-wise tensor-core kernel: scale the decoded [BN, BK] weight tile (one
    multiply-add per weight, weights rounded to the activation dtype once, as a
    dequantize-then-matmul would) rather than the [BM, BN] dot of the exact codes
    after each K tile (3 BM / BK per weight). Per channel the scale is applied once
    after the loop either way."""
    return fmt.group_size != -1 and (bm > 16 or bk < 64)


def _x16(x: torch.Tensor, m: int, k: int) -> int:
    """X16 of the word-wise GEMV: 1 fp16 / 2 bf16 activations read 4 at a time
    (8-byte loads: every row 8-byte aligned), else 0 (one load per element)."""
    code = {torch.float16: 1, torch.bfloat16: 2}.get(x.dtype, 0)
    if code and x.data_ptr() % 8 == 0 and (m == 1 or k % 4 == 0):
        return code
    return 0


def supports_format(fmt) -> bool:
    return fmt.family in ("int", "nf4", "gguf")


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
    key = cache_key(path, fmt.spec(), _DTYPE_NAMES.get(x_dtype, "none"), n, k, m)
    cfg = cache.get(key)
    if cfg is not None and _usable(path, cfg, packed):
        return cfg
    if qdata is not None and autotune_enabled() and not torch.cuda.is_current_stream_capturing():
        from .tuning import tune_key

        cfg = tune_key(path, fmt, x_dtype, n, k, m, device, qdata, cache=cache, key=key)
        if cfg is not None:
            return cfg
    return default


# --- launches -----------------------------------------------------------------
def dequantize(qdata, fmt, shape, dtype: torch.dtype, config: Optional[Config] = None) -> torch.Tensor:
    n, k = shape
    dev = qdata[0].device
    out = torch.empty((n, k), dtype=dtype, device=dev)
    ptrs, ints, (fid, c0, c1, c2), perm = format_args(fmt, qdata, shape)
    cfg = config or get_config("dequant", fmt, None, n, k, 0, dev, qdata)
    grid = (triton.cdiv(n, cfg.BN), triton.cdiv(k, cfg.BK))
    K.dequant_kernel[grid](
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
        ptrs, ints, consts = _gemv_packed_args(fmt, qdata, shape)
        PK.gemv_packed_kernel[(tiles, split, triton.cdiv(m, bm))](
            x, out, ws, bias if bias is not None else out, perm if perm is not None else x, *ptrs, m, n, k, per,
            *ints, **consts, HAS_PERM=perm is not None, HAS_BIAS=bias is not None, BM=bm, BN=cfg.BN, BK=bk, SPLIT=split,
            X16=_x16(x, m, k), SOFT_BF16=soft_bf16, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    elif path == "gemv":
        bm = gemv_bm(m)
        tiles = triton.cdiv(n, cfg.BN)
        split, per = resolve_split(cfg, tiles, k, sm_count(dev))
        ws = torch.empty((split, m, n), dtype=torch.float32, device=dev) if split > 1 else out
        K.gemv_kernel[(tiles, split)](
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
            PK.mm_int_kernel[(tiles, split)](
                x, out, ws, bias if bias is not None else out, perm if perm is not None else x, q, sc,
                t.get("zeros", sc), m, n, k, per, fmt.packed_row_bytes(k), fmt.num_groups(k),
                BITS=fmt.bits, HAS_ZERO=not fmt.symmetric, GSHIFT=c2, HAS_PERM=perm is not None,
                HAS_BIAS=bias is not None, SOFT_BF16=soft_bf16,
                SCALE_W=scale_weights(fmt, bm, cfg.BK), **mm_common,
            )
        else:
            K.mm_kernel[(tiles, split)](
                x, out, ws, bias if bias is not None else out, perm if perm is not None else x, *ptrs,
                m, n, k, per, *ints, **common, **mm_common,
            )
    if split > 1:
        K.reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)](
            ws, out, bias if bias is not None else out, m, n,
            SPLIT=split, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, SOFT_BF16=soft_bf16,
        )
    return out
