"""The Triton kernels (``pyquant.triton_kernels``) as a backend of every op they serve.

Experimental until a GPU run lists their names in ``verified_kernels.json``:
until then only ``kernel="triton"`` reaches them. Nothing here imports triton
at import time; ``usable`` only asks whether it imports, and the kernels load
at the first call.

Where they run:
* CUDA tensors, when triton imports;
* CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``, which
  Triton reads when the kernels are defined: set it before the first call).

qmatmul registers one kernel per path, chosen by M: ``gemv`` (M <= 4),
``splitk`` (M <= 64), ``gemm`` (larger M), so that each path is verified on its
own. Within a path the format picks the kernel (``triton_kernels`` says which).

This module is also the one place that loads ``pyquant.triton_kernels`` from a
source checkout (``PYTHONPATH=<repo>``, no install): there the sub-package lives
at ``<repo>/triton_kernels`` (setup.py maps it to ``pyquant.triton_kernels``),
and a finder appended to the end of ``sys.meta_path`` resolves that one name to
the source folder when no installed copy exists. It imports nothing by itself.
"""
from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

from ...formats import GGUF, NF4, Int
from ..dispatch import register_kernel
from ..primitives import tiny_scale
from ..reference.hqq import solver_schedule

PACKAGE = "pyquant.triton_kernels"
_SRC_DIR = Path(__file__).resolve().parents[3] / "triton_kernels"
_TRUE = ("1", "true", "on", "yes")


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != PACKAGE:
            return None
        init = _SRC_DIR / "__init__.py"
        # only pyquant's own checkout (setup.py maps the folder), never another
        # distribution's top-level ``triton_kernels`` next to an install
        if not (init.is_file() and (_SRC_DIR.parent / "setup.py").is_file()):
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(_SRC_DIR)])


if not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
    sys.meta_path.append(_SourceTreeFinder())


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a missing or broken install: the other backends take over
        return False
    return True


def interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def kernels():
    """The ``pyquant.triton_kernels`` package (its kernels import triton on first use)."""
    return importlib.import_module(PACKAGE)


def usable(device) -> bool:
    """Can the Triton kernels run on tensors of ``device``?"""
    if device.type == "cuda":
        return triton_importable()
    if device.type != "cpu" or not (interpret_requested() and triton_importable()):
        return False
    # Kernels defined before TRITON_INTERPRET was set are compiled for a GPU.
    pkg = sys.modules.get(PACKAGE)
    return pkg is None or not pkg.kernels_loaded() or pkg.interpreting()


def _format_ok(fmt) -> bool:
    return isinstance(fmt, (Int, NF4, GGUF))


def _supports_dequantize(fmt, device, m):
    return _format_ok(fmt) and usable(device)


def _supports_path(lo, hi):
    def supports(fmt, device, m):
        return lo <= m <= hi and _format_ok(fmt) and usable(device)

    return supports


def _sources(*patterns):
    """``() -> (package folder, files)`` of the Triton modules a kernel runs."""

    def files():
        spec = importlib.util.find_spec(PACKAGE)
        root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else _SRC_DIR
        return root, sorted({p for pat in patterns for p in root.glob(pat)}) or [root / patterns[0]]

    return files


_MATMUL_SOURCES = _sources("__init__.py", "decode.py", "matmul/*.py", "tuning/*.py")
_SOLVER_SOURCES = _sources("__init__.py", "solvers/*.py")


@register_kernel("dequantize", "triton", "any", _supports_dequantize, sources=_MATMUL_SOURCES)
def dequantize(qdata, fmt, shape, dtype):
    return kernels().dequantize(qdata, fmt, shape, dtype)


def _qmatmul(path):
    def fn(x2d, qdata, fmt, shape, bias):
        return kernels().qmatmul(x2d, qdata, fmt, shape, bias, path=path)

    fn.__name__ = f"triton_{path}"
    return fn


def _qmatmul_plan(path):
    """Launch-plan factory (ops/plans.py): ``matmul.launch.QmatmulPlan`` binds the
    config and arguments once per M and launches compiled kernels directly."""

    def plan(qdata, fmt, shape, device, m):
        return importlib.import_module(PACKAGE + ".matmul.launch").QmatmulPlan(qdata, fmt, shape, path=path)

    return plan


_BIG = 1 << 62
for _tag, _lo, _hi in (("gemv", 0, 4), ("splitk", 5, 64), ("gemm", 65, _BIG)):
    register_kernel("qmatmul", "triton", "any", _supports_path(_lo, _hi), tag=_tag, plan=_qmatmul_plan(_tag),
                    sources=_MATMUL_SOURCES)(_qmatmul(_tag))


# --- solvers -----------------------------------------------------------------------
def _solver_ok(fmt, device, m):
    return usable(device)


@register_kernel("gptq_block_update", "triton", "int", _solver_ok, sources=_SOLVER_SOURCES)
def gptq_block_update(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out):
    kernels().gptq_block_update(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out)


@register_kernel("hqq_solve", "triton", "int", _solver_ok, sources=_SOLVER_SOURCES)
def hqq_solve(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop):
    schedule = solver_schedule(iters, lp_norm, beta, kappa).to(w.device)
    return kernels().hqq_solve(w, bits, group, scale_dtype, lp_norm, kappa == 1.0, early_stop, schedule,
                               tiny_scale(scale_dtype))
