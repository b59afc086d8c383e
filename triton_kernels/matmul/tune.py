"""``tune(qw)``: autotune every path of one weight on its GPU, saved per GPU name.

Never on the CPU interpreter: the shipped default configs are used there.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from pyquant.errors import DeviceError

from ..tuning import autotune
from ..tuning.cache import get_cache
from ..tuning.configs import M_BUCKETS, Config, cache_key, path_for_m
from .args import DTYPE_NAMES
from .launch import gpu_name, interpreting, tuning_job

DEFAULT_MS = tuple(b for b in M_BUCKETS if b <= 2048)
TUNABLE = ("gemv", "splitk", "gemm", "dequant")


def check_device(device: torch.device) -> None:
    if device.type != "cuda" or interpreting():
        raise DeviceError(
            f"Triton autotuning needs a CUDA device without TRITON_INTERPRET (weight on {device}); "
            "the shipped default configs are used otherwise"
        )


def tune(qw, m_values: Optional[Iterable[int]] = None, dtype: Optional[torch.dtype] = None,
         paths: Optional[Iterable[str]] = None, save: bool = True, verbose: bool = False) -> Dict[str, Config]:
    """Tune every path (or ``paths``, among "gemv", "splitk", "gemm", "dequant")
    for the weight ``qw`` (a QuantizedWeight on a CUDA device) and activations
    of ``dtype`` (default fp16) with M in ``m_values`` (default 1..2048 by
    powers of two). Returns {cache key: config}; saves the per-GPU cache."""
    device = qw.device
    check_device(device)
    dtype = dtype or torch.float16
    n, k = qw.shape
    fmt = qw.format
    qdata = qw.tensor_list()
    wanted = set(paths) if paths is not None else set(TUNABLE)
    bad = wanted - set(TUNABLE)
    if bad:
        raise ValueError(f"unknown paths {sorted(bad)}")
    jobs = {}  # cache key -> (path, M): one job per M bucket
    for m in (m_values if m_values is not None else DEFAULT_MS):
        m = int(m)
        path = path_for_m(m)
        if path in wanted:
            jobs.setdefault(cache_key(path, fmt.spec(), DTYPE_NAMES[dtype], n, k, m), (path, m))
    if "dequant" in wanted:
        jobs[cache_key("dequant", fmt.spec(), "none", n, k, 0)] = ("dequant", 0)
    cache = get_cache(gpu_name(device))
    out: Dict[str, Config] = {}
    for key, (path, m) in jobs.items():
        cfg = autotune.tune_key(key, *tuning_job(path, fmt, dtype, n, k, m, qdata), cache, save=False,
                                verbose=verbose)
        if cfg is not None:
            out[key] = cfg
    if save:
        cache.save()
    return out
