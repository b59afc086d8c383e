"""Lazy access to the compiled extension ``pyquant._C``.

Importing pyquant never requires the extension: when it is missing (a pure
Python install, a failed build) the reference kernels take over and we say so
once, at the first call that wanted a compiled kernel.
"""
from __future__ import annotations

import functools
import importlib
import warnings


@functools.lru_cache(maxsize=None)
def load():
    """Return the ``pyquant._C`` module, or None if it cannot be imported."""
    try:
        return importlib.import_module("pyquant._C")
    except ImportError as exc:  # pragma: no cover - depends on the install
        warnings.warn(
            f"pyquant: compiled extension unavailable ({exc}); "
            "using the pure-torch reference kernels",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def available() -> bool:
    return load() is not None
