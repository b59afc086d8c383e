"""Lazy access to the compiled extension ``pyquant._C``.

Importing pyquant never requires the extension: when it is missing (a pure
Python install, a failed build) the reference kernels take over and we say so
once, at the first call that wanted a compiled kernel.

The CPU kernels run at the SIMD level ``pyquant._C`` picks at run time (see
csrc/cpu/simd.h): the best the CPU has (scalar, avx2, avxvnni, avx512), or
the one the environment variable ``PYQUANT_SIMD`` names, or the one
``cpu_simd(level)`` forces for a block of code. A level the CPU lacks is a
``KernelUnavailableError``, never an illegal instruction.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import warnings

from .errors import KernelUnavailableError

SIMD_ENV = "PYQUANT_SIMD"


@functools.lru_cache(maxsize=None)
def _module():
    try:
        return importlib.import_module("pyquant._C")
    except ImportError as exc:  # pragma: no cover - depends on the install
        warnings.warn(
            f"pyquant: compiled extension unavailable ({exc}); "
            "using the pure-torch reference kernels",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


_simd_ok = False


def load():
    """Return the ``pyquant._C`` module, or None if it cannot be imported.

    Raises KernelUnavailableError while ``PYQUANT_SIMD`` names a SIMD level
    that is unknown or that this CPU lacks (no kernel may run at a level
    nobody chose)."""
    global _simd_ok
    mod = _module()
    if mod is not None and not _simd_ok:
        try:
            mod.simd_level()
        except ValueError as exc:
            raise KernelUnavailableError(str(exc)) from None
        _simd_ok = True
    return mod


def available() -> bool:
    return load() is not None


def simd_levels():
    """The SIMD levels this CPU supports, lowest first ([] without the extension)."""
    mod = _module()
    return list(mod.simd_levels()) if mod is not None else []


def simd_emulated() -> bool:
    """True for the test build whose avxvnni / avx512 levels run SIMDe's AVX2
    versions of their instructions (README, "Build options"): its kernels are
    right and slow, so timings from it mean nothing."""
    mod = _module()
    return bool(mod is not None and getattr(mod, "simd_emulated", lambda: False)())


@contextlib.contextmanager
def cpu_simd(level: str):
    """Run the block with the CPU kernels at SIMD ``level`` ("scalar", "avx2",
    "avxvnni", "avx512"), process-wide; the previous level is restored after.
    KernelUnavailableError if the CPU lacks it."""
    mod = load()
    if mod is None:
        raise KernelUnavailableError("cpu_simd needs the compiled extension pyquant._C")
    before = mod.simd_level()
    try:
        mod.set_simd_level(level)
    except ValueError as exc:
        raise KernelUnavailableError(str(exc)) from None
    try:
        yield
    finally:
        mod.set_simd_level(before)
