"""Autotuning: time candidate configs with a launch callable, keep the fastest.

Knows nothing about formats or kernels: the caller (``matmul/launch.py``,
``matmul/tune.py``) hands over the cache key, the candidate configs and a
``launch(config)`` that runs the kernel once on the real weight; so the
launcher imports this module and never the other way round.

Runs only when asked: ``pyquant.triton_kernels.tune(qw, ...)``, or
``PYQUANT_AUTOTUNE=1`` (then the first call of each (path, format, x dtype,
N, K, M bucket) that misses the cache tunes it, outside CUDA-graph capture).
Results go to the per-GPU JSON cache (``cache.py``).
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional

import torch

from .cache import TuningCache
from .configs import Config

Launch = Callable[[Config], object]


def _time(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def best_config(configs: Iterable[Config], launch: Launch, verbose: bool = False, label: str = "") -> Optional[Config]:
    """The config whose launch has the lowest median time; None when none ran."""
    best, best_t = None, float("inf")
    for cfg in configs:
        fn = lambda cfg=cfg: launch(cfg)  # noqa: E731
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


def tune_key(key: str, configs: Iterable[Config], launch: Launch, cache: TuningCache, save: bool = True,
             verbose: bool = False) -> Optional[Config]:
    """Tune one cache key and record the winner in ``cache`` (and its file when ``save``)."""
    best = best_config(configs, launch, verbose, key)
    if best is None:
        warnings.warn(f"pyquant: no Triton config ran for {key}; keeping the default", stacklevel=2)
        return None
    cache.put(key, best)
    if save:
        cache.save()
    return best


__all__ = ["Launch", "best_config", "tune_key"]
