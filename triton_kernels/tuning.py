"""Autotuning: time the candidate configs of a path on the real weight, keep the best.

Runs only when asked: ``pyquant.triton_kernels.tune(qw, ...)``, or
``PYQUANT_AUTOTUNE=1`` (then the first call of each (path, format, x dtype,
N, K, M bucket) that misses the cache tunes it, outside CUDA-graph capture).
Never on the CPU interpreter. Results go to the per-GPU JSON cache
(``cache.py``).
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, Optional

import torch

from pyquant.errors import DeviceError

from . import _launch
from .cache import TuningCache, get_cache
from .configs import M_BUCKETS, Config, cache_key, candidates, path_for_m

DEFAULT_MS = tuple(b for b in M_BUCKETS if b <= 2048)


def _time(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" or _launch.interpreting():
        raise DeviceError(
            f"Triton autotuning needs a CUDA device without TRITON_INTERPRET (weight on {device}); "
            "the shipped default configs are used otherwise"
        )


def _best(fns: Dict[Config, object], verbose: bool, label: str) -> Optional[Config]:
    best, best_t = None, float("inf")
    for cfg, fn in fns.items():
        try:
            fn()  # compile outside the timed region
            torch.cuda.synchronize()
            t = _time(fn)
        except Exception as exc:  # a config that does not fit this GPU (shared memory, registers)
            if verbose:
                print(f"  {label} {cfg}: failed ({exc.__class__.__name__})")
            continue
        if verbose:
            print(f"  {label} {cfg}: {t * 1e3:.1f} us")
        if t < best_t:
            best, best_t = cfg, t
    return best


def tune_key(path, fmt, x_dtype, n, k, m, device, qdata, cache: Optional[TuningCache] = None,
             key: Optional[str] = None, save: bool = True, verbose: bool = False) -> Optional[Config]:
    """Tune one cache key on ``qdata`` (the packed tensors) and record it."""
    _check_device(device)
    cache = cache or get_cache(_launch.gpu_name(device))
    shape = (n, k)
    if path == "dequant":
        dtype = x_dtype or torch.float16
        key = key or cache_key(path, fmt.spec(), "none", n, k, 0)
        fns = {c: (lambda c=c: _launch.dequantize(qdata, fmt, shape, dtype, config=c)) for c in candidates(path, 0)}
    else:
        dtype = x_dtype or torch.float16
        key = key or cache_key(path, fmt.spec(), _launch._DTYPE_NAMES[dtype], n, k, m)
        x = torch.randn((m, k), dtype=dtype, device=qdata[0].device)
        fns = {
            c: (lambda c=c: _launch.qmatmul(x, qdata, fmt, shape, None, path=path, config=c))
            for c in candidates(path, m, packed=_launch.packed_path(path, fmt, k))
        }
    best = _best(fns, verbose, key)
    if best is None:
        warnings.warn(f"pyquant: no Triton config ran for {key}; keeping the default", stacklevel=2)
        return None
    cache.put(key, best)
    if save:
        cache.save()
    return best


def tune(qw, m_values: Optional[Iterable[int]] = None, dtype: Optional[torch.dtype] = None,
         paths: Optional[Iterable[str]] = None, save: bool = True, verbose: bool = False) -> Dict[str, Config]:
    """Tune every path (or ``paths``, among "gemv", "splitk", "gemm", "dequant")
    for the weight ``qw`` (a QuantizedWeight on a CUDA device) and activations
    of ``dtype`` (default fp16) with M in ``m_values`` (default 1..2048 by
    powers of two). Returns {cache key: config}; saves the per-GPU cache."""
    device = qw.device
    _check_device(device)
    dtype = dtype or torch.float16
    n, k = qw.shape
    qdata = qw.tensor_list()
    wanted = set(paths) if paths is not None else {"gemv", "splitk", "gemm", "dequant"}
    bad = wanted - {"gemv", "splitk", "gemm", "dequant"}
    if bad:
        raise ValueError(f"unknown paths {sorted(bad)}")
    cache = get_cache(_launch.gpu_name(device))
    out: Dict[str, Config] = {}
    done = set()
    for m in (m_values if m_values is not None else DEFAULT_MS):
        m = int(m)
        path = path_for_m(m)
        if path not in wanted:
            continue
        key = cache_key(path, qw.format.spec(), _launch._DTYPE_NAMES[dtype], n, k, m)
        if key in done:
            continue
        done.add(key)
        cfg = tune_key(path, qw.format, dtype, n, k, m, device, qdata, cache=cache, key=key, save=False,
                       verbose=verbose)
        if cfg is not None:
            out[key] = cfg
    if "dequant" in wanted:
        key = cache_key("dequant", qw.format.spec(), "none", n, k, 0)
        cfg = tune_key("dequant", qw.format, dtype, n, k, 0, device, qdata, cache=cache, key=key, save=False,
                       verbose=verbose)
        if cfg is not None:
            out[key] = cfg
    if save:
        cache.save()
    return out
