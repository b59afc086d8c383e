"""The one place where a backend is chosen for an op.

Backends register kernels with :func:`register_kernel`; :func:`select_kernel`
picks one by device, format and M (the number of activation rows), or honours
an explicit ``kernel=`` override. Rule 6 of DESIGN.md lives here: on a GPU a
kernel is chosen by default only if it is listed in ``verified_kernels.json``
(written from a GPU results file), otherwise it is reachable only by name.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Dict, List, Tuple

import torch

from .. import _ext
from ..errors import KernelUnavailableError

BACKENDS = ("cuda", "triton", "cpu", "dequant", "reference")
OPS = ("dequantize", "qmatmul", "pack", "unpack", "w8a8_matmul")


@dataclasses.dataclass(frozen=True)
class Kernel:
    op: str
    backend: str
    name: str  # e.g. "int_gemv": what verified_kernels.json and benchmarks refer to
    supports: Callable  # (fmt, device, m) -> bool
    fn: Callable


_REGISTRY: Dict[Tuple[str, str], List[Kernel]] = {}


def register_kernel(op: str, backend: str, name: str, supports: Callable):
    """Decorator registering ``fn`` as ``backend``'s kernel for ``op``."""
    if op not in OPS or backend not in BACKENDS:
        raise ValueError(f"unknown op/backend {op!r}/{backend!r}")

    def deco(fn):
        _REGISTRY.setdefault((op, backend), []).append(Kernel(op, backend, name, supports, fn))
        return fn

    return deco


@functools.lru_cache(maxsize=None)
def verified_kernels() -> frozenset:
    """Names of GPU kernels that passed the test suite on a real device."""
    path = os.path.join(os.path.dirname(__file__), "verified_kernels.json")
    try:
        with open(path) as f:
            return frozenset(json.load(f).get("verified", []))
    except FileNotFoundError:
        return frozenset()


def _find(op: str, backend: str, fmt, device: torch.device, m: int):
    for k in _REGISTRY.get((op, backend), ()):
        if k.supports(fmt, device, m):
            return k
    return None


def select_kernel(op: str, fmt, device: torch.device, m: int = 1, kernel: str = "auto") -> Kernel:
    if kernel != "auto":
        if kernel not in BACKENDS:
            raise KernelUnavailableError(f"kernel must be 'auto' or one of {BACKENDS}, got {kernel!r}")
        k = _find(op, kernel, fmt, device, m)
        if k is None:
            raise KernelUnavailableError(
                f"no {kernel!r} kernel for {op} with format {fmt.spec()} on device {device} (M={m})"
            )
        return k
    if device.type == "cpu":
        order = ("cpu", "reference")
        _ext.load()  # the first call that wants compiled kernels says once if they are missing
    else:
        order = ("cuda", "triton", "dequant", "reference")
    for backend in order:
        k = _find(op, backend, fmt, device, m)
        if k is None:
            continue
        if backend in ("cuda", "triton") and k.name not in verified_kernels():
            continue  # experimental until a GPU run has passed it
        return k
    raise KernelUnavailableError(f"no kernel for {op} with format {fmt.spec()} on device {device}")


def registered() -> Dict[Tuple[str, str], List[str]]:
    """(op, backend) -> kernel names, for ``pyquant.env()`` and tests."""
    return {key: [k.name for k in ks] for key, ks in _REGISTRY.items()}
