"""Registers the Triton kernels (``pyquant.triton_kernels``) with dispatch.

Experimental until a GPU run lists their names in ``verified_kernels.json``:
until then only ``kernel="triton"`` reaches them. Nothing here imports triton;
``supports`` only asks whether it is importable, and the kernels load at the
first call.

Where they run:
* CUDA tensors, when triton imports;
* CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, which
  Triton reads when the kernels are defined: set it before the first call).

qmatmul registers one kernel per path, chosen by M: ``triton_gemv`` (M <= 4),
``triton_splitk`` (M <= 64), ``triton_gemm`` (larger M), so that each path can
be verified on its own. Within a path the format picks the kernel: Int4/Int8
(and NF4 rows of whole 32-code chunks on the GEMV) get the word-wise kernels of
``triton_kernels/matmul/*_packed.py``; every other format the generic decoders.

In a source checkout (``PYTHONPATH=<repo>``, no install) the sub-package lives
at ``<repo>/triton_kernels``; setup.py maps it to ``pyquant.triton_kernels``.
A finder appended to the end of ``sys.meta_path`` resolves that one name to
the source folder when no installed copy exists, so the same import works in
both cases. It imports nothing by itself.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

from ..formats import GGUF, NF4, Int
from .dispatch import register_kernel

_NAME = "pyquant.triton_kernels"
_SRC_DIR = Path(__file__).resolve().parents[2] / "triton_kernels"
_TRUE = ("1", "true", "on", "yes")


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _NAME:
            return None
        init = _SRC_DIR / "__init__.py"
        # only pyquant's own checkout (setup.py maps the folder), never another
        # distribution's top-level ``triton_kernels`` next to an install
        if not (init.is_file() and (_SRC_DIR / "decode.py").is_file() and (_SRC_DIR.parent / "setup.py").is_file()):
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(_SRC_DIR)])


if not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
    sys.meta_path.append(_SourceTreeFinder())


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a missing or broken install: the reference takes over
        return False
    return True


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def kernels():
    """The ``pyquant.triton_kernels`` module (imports it, and triton, on first use)."""
    import importlib

    return importlib.import_module(_NAME)


def _device_ok(device) -> bool:
    if device.type == "cuda":
        return triton_importable()
    if device.type == "cpu":
        if not (interpret_requested() and triton_importable()):
            return False
        # Kernels defined before TRITON_INTERPRET was set are compiled for a GPU.
        mod = sys.modules.get(_NAME + ".matmul.dequant")
        return mod is None or type(mod.dequant_kernel).__name__ == "InterpretedFunction"
    return False


def _format_ok(fmt) -> bool:
    return isinstance(fmt, (Int, NF4, GGUF))


def _supports_dequantize(fmt, device, m):
    return _format_ok(fmt) and _device_ok(device)


def _supports_path(lo, hi):
    def supports(fmt, device, m):
        return lo <= m <= hi and _format_ok(fmt) and _device_ok(device)

    return supports


@register_kernel("dequantize", "triton", "triton_dequantize", _supports_dequantize)
def dequantize(qdata, fmt, shape, dtype):
    return kernels().dequantize(qdata, fmt, shape, dtype)


def _qmatmul(path):
    def fn(x2d, qdata, fmt, shape, bias):
        return kernels().qmatmul(x2d, qdata, fmt, shape, bias, path=path)

    fn.__name__ = f"triton_{path}"
    return fn


_BIG = 1 << 62
register_kernel("qmatmul", "triton", "triton_gemv", _supports_path(0, 4))(_qmatmul("gemv"))
register_kernel("qmatmul", "triton", "triton_splitk", _supports_path(5, 64))(_qmatmul("splitk"))
register_kernel("qmatmul", "triton", "triton_gemm", _supports_path(65, _BIG))(_qmatmul("gemm"))
