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
from triton.runtime import driver

try:
    from triton import knobs
except ImportError:  # a triton without knobs (< 3.4): every launch goes through the JIT
    knobs = None

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


# --- qmatmul launch plans ---------------------------------------------------------
# Placeholders for the tensors a call brings; every other argument is fixed by the
# weight, M and the config.
X, OUT, WS, BIAS = "<x>", "<out>", "<ws>", "<bias>"
_SLOTS = (X, OUT, WS, BIAS)


def _idle(hook) -> bool:
    # None (triton < 3.9) or an empty HookChain: the launcher would call nothing
    return hook is None or getattr(hook, "calls", None) == []


def _no_launch_hooks() -> bool:
    """No profiler hook wants launch metadata: the launcher can be called bare."""
    return _idle(knobs.runtime.launch_enter_hook) and _idle(knobs.runtime.launch_exit_hook)


def _argv_builder(template: tuple):
    """``(vals, template) -> argv``: the bound arguments with the call's tensors (x, out,
    ws, bias) in their placeholders' positions, as one tuple display compiled once
    per launch: a loop over the slots costs more host time than the launch itself."""
    items = []
    for i, v in enumerate(template):
        slot = _SLOTS.index(v) if isinstance(v, str) and v in _SLOTS else None
        items.append(f"t[{i}]" if slot is None else f"v[{slot}]")
    return eval(f"lambda v, t: ({', '.join(items)},)")  # noqa: S307 (built from indices only)


class _Launch:
    """One kernel launch with its arguments bound: by name through the JIT the first
    time (compiling or finding the specialisation), then straight to the compiled
    kernel's launcher with the same arguments in the same order. The key of the
    QmatmulPlan entry holding it fixes everything the JIT specialises on."""

    __slots__ = ("kernel", "grid", "grid3", "params", "options", "names", "template", "argv", "compiled")

    def __init__(self, kernel, grid, params: dict, options: dict):
        self.kernel, self.grid, self.params, self.options = kernel, grid, params, options
        self.grid3 = (*grid, 1, 1)[:3]
        self.names = kernel.arg_names
        self.template = tuple(params[n] for n in self.names)
        self.argv = _argv_builder(self.template)
        self.compiled = None

    def __call__(self, vals: tuple, stream: Optional[int] = None) -> Optional[int]:
        """Launch with ``vals`` = (x, out, ws, bias) in the placeholders; returns the
        stream used on the direct path (the next launch of the same call passes it on:
        hooks checked, stream read once per call), None after a JIT launch."""
        argv = self.argv(vals, self.template)
        c = self.compiled
        if c is not None and (stream is not None or _no_launch_hooks()):
            if stream is None:
                drv = driver.active
                stream = drv.get_current_stream(drv.get_current_device())
            g = self.grid3
            c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, None, None, None, *argv)
            return stream
        c = self.kernel[self.grid](*argv, **self.options)
        if knobs is not None and getattr(c, "packed_metadata", None) is not None and hasattr(c, "function"):
            self.compiled = c  # None under the interpreter: every call goes through it
        return None


class QmatmulPlan:
    """``run(x (M, K) contiguous, bias) -> (M, N)`` for one weight and path: the
    config, grid, format arguments and bound launches are computed once per (M, x
    dtype, x and bias alignment) and reused; a call allocates the output (and the
    split-K workspace) and launches. Nothing here syncs with the device."""

    def __init__(self, qdata, fmt, shape, path: Optional[str] = None, config: Optional[Config] = None):
        self.qdata, self.fmt, self.shape = list(qdata), fmt, tuple(shape)
        self.n = self.shape[0]
        self.path, self.config = path, config
        self.device = self.qdata[0].device
        self._entries = {}

    def __call__(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = x.shape[0]
        dtype = x.dtype
        out = x.new_empty((m, self.n))
        if m == 0:
            return out
        if bias is None:
            key = (m, dtype, x.data_ptr() & 15)
        else:
            if not bias.is_contiguous():
                bias = bias.contiguous()
            key = (m, dtype, x.data_ptr() & 15, bias.dtype, bias.data_ptr() & 15)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._prepare(x, bias)
        main, reduce, ws_shape = entry
        ws = torch.empty(ws_shape, dtype=torch.float32, device=self.device) if ws_shape else out
        vals = (x, out, ws, bias if bias is not None else out)
        stream = main(vals)
        if reduce is not None:
            reduce(vals, stream)
        return out

    def _prepare(self, x, bias):
        """-> (main launch, reduce launch or None, workspace shape or None)."""
        fmt, qdata, (n, k) = self.fmt, self.qdata, self.shape
        m, dev = x.shape[0], self.device
        path = self.path or path_for_m(m)
        if path not in ("gemv", "splitk", "gemm"):
            raise ValueError(f"path must be 'gemv', 'splitk' or 'gemm', got {path!r}")
        cfg = self.config or get_config(path, fmt, x.dtype, n, k, m, dev, qdata)
        ptrs, ints, (fid, c0, c1, c2), perm = format_args(fmt, qdata, self.shape)
        has_bias, has_perm = bias is not None, perm is not None
        soft_bf16 = x.dtype == torch.bfloat16 and interpreting()
        perm_arg = perm if has_perm else X
        opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if path == "gemv" and packed_gemv(fmt, k):
            bk = max(32, cfg.BK)
            bm = min(4, gemv_bm(m))
            tiles = triton.cdiv(n, cfg.BN)
            split, per = resolve_split(dataclasses.replace(cfg, BK=bk), tiles, k, sm_count(dev), waves=1)
            gptrs, gints, consts = gemv_packed_args(fmt, qdata, self.shape)
            params = dict(zip(("qw", "sc", "zr", "aux0", "aux1", "aux2"), gptrs),
                          x=X, out=OUT, ws=WS if split > 1 else OUT, bias=BIAS, perm=perm_arg, M=m, N=n, K=k,
                          k_per_split=per, row_bytes=gints[0], ng=gints[1], **consts, HAS_PERM=has_perm,
                          HAS_BIAS=has_bias, BM=bm, BN=cfg.BN, BK=bk, SPLIT=split, X16=x16_mode(x, m, k),
                          SOFT_BF16=soft_bf16)
            main = _Launch(gemv_packed_kernel, (tiles, split, triton.cdiv(m, bm)), params, opts)
        else:
            common = dict(FMT=fid, C0=c0, C1=c1, C2=c2, HAS_PERM=has_perm, HAS_BIAS=has_bias, SOFT_BF16=soft_bf16)
            pointer_args = dict(zip(("p0", "p1", "p2", "p3", "p4", "p5"), ptrs))
            if path == "gemv":
                bm = gemv_bm(m)
                tiles = triton.cdiv(n, cfg.BN)
                split, per = resolve_split(cfg, tiles, k, sm_count(dev))
                params = dict(pointer_args, x=X, out=OUT, ws=WS if split > 1 else OUT, bias=BIAS, perm=perm_arg,
                              M=m, N=n, K=k, k_per_split=per, i0=ints[0], i1=ints[1], **common,
                              UNIFORM=uniform_groups(fmt, k, cfg.BK), BM=bm, BN=cfg.BN, BK=cfg.BK, SPLIT=split)
                main = _Launch(gemv_kernel, (tiles, split), params, opts)
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
                mm_common = dict(x=X, out=OUT, ws=WS if split > 1 else OUT, bias=BIAS, perm=perm_arg, M=m, N=n, K=k,
                                 k_per_split=per, BM=bm, BN=cfg.BN, BK=cfg.BK, SPLIT=split, GROUP_M=cfg.GROUP_M,
                                 X_F32=x.dtype == torch.float32,
                                 UPCAST_DOT=x.dtype == torch.bfloat16 and interpreting())
                if packed:
                    t = dict(zip(fmt.tensor_specs(self.shape), qdata))
                    sc = t["scales"]
                    params = dict(mm_common, qw=t["qweight"], sc=sc, zr=t.get("zeros", sc),
                                  row_bytes=fmt.packed_row_bytes(k), ng=fmt.num_groups(k), BITS=fmt.bits,
                                  HAS_ZERO=not fmt.symmetric, GSHIFT=c2, HAS_PERM=has_perm, HAS_BIAS=has_bias,
                                  SOFT_BF16=soft_bf16, SCALE_W=scale_weights(fmt, bm, cfg.BK))
                    main = _Launch(mm_int_kernel, (tiles, split), params, opts)
                else:
                    params = dict(pointer_args, **mm_common, i0=ints[0], i1=ints[1], **common,
                                  UNIFORM=uniform_groups(fmt, k, cfg.BK))
                    main = _Launch(mm_kernel, (tiles, split), params, opts)
        if split == 1:
            return main, None, None
        reduce = _Launch(reduce_kernel, (triton.cdiv(m * n, REDUCE_BLOCK),),
                         dict(ws=WS, out=OUT, bias=BIAS, M=m, N=n, SPLIT=split, HAS_BIAS=has_bias,
                              BLOCK=REDUCE_BLOCK, SOFT_BF16=soft_bf16), {})
        return main, reduce, (split, m, n)


def qmatmul(
    x: torch.Tensor,
    qdata,
    fmt,
    shape,
    bias: Optional[torch.Tensor] = None,
    path: Optional[str] = None,
    config: Optional[Config] = None,
) -> torch.Tensor:
    """``x (M, K) contiguous @ W_hat.T (+ bias)`` -> ``(M, N)`` in x.dtype (a plan
    used once; keep a ``QmatmulPlan`` to skip the host work on later calls)."""
    return QmatmulPlan(qdata, fmt, shape, path, config)(x, bias)
