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


def assert_plan_matches_function(backend, qw, ms, dtype, seed: int) -> None:
    """``backend.qmatmul_plan`` (a launch plan, ops/plans.py) gives the bits of
    ``backend.qmatmul`` for M in ``ms``, with and without a bias, and an empty x."""
    import torch

    n, k = qw.shape
    qdata, bias = qw.tensor_list(), torch.randn(n)
    g = torch.Generator().manual_seed(seed)
    for m in ms:
        plan = backend.qmatmul_plan(qdata, qw.format, qw.shape, torch.device("cpu"), m)
        x = torch.randn(m, k, generator=g).to(dtype)
        for b in (None, bias):
            want = backend.qmatmul(x, qdata, qw.format, qw.shape, b)
            got = plan(x, b)
            assert got.dtype == dtype and torch.equal(got, want), (m, b is None)
    assert plan(torch.empty(0, k, dtype=dtype), None).shape == (0, n)
