"""Test helpers around the kernel registry (pyquant.ops.dispatch)."""
from __future__ import annotations

import contextlib
import dataclasses

from pyquant.ops import dispatch


def swap_kernel(monkeypatch, name: str, fn) -> None:
    """Replace the function of the registered kernel ``name`` for one test
    (``monkeypatch`` restores it), e.g. to see which kernel dispatch calls."""
    for key, kernels in dispatch._REGISTRY.items():
        for i, k in enumerate(kernels):
            if k.name == name:
                swapped = list(kernels)
                swapped[i] = dataclasses.replace(k, fn=fn)
                monkeypatch.setitem(dispatch._REGISTRY, key, swapped)
                return
    raise KeyError(f"no registered kernel named {name!r}")


@contextlib.contextmanager
def simd_level(level: str):
    """Run the block with the C++ kernels at SIMD ``level`` ("scalar", "avx2", ..., "best")."""
    from pyquant import _ext

    C = _ext.load()
    assert C.set_simd_level(level)
    try:
        yield
    finally:
        C.set_simd_level("best")
