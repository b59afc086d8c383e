"""``pyquant.env()``: what is live in this process."""
from __future__ import annotations

import importlib.util
import os
import platform

import torch

from . import _ext
from ._version import __version__
from .errors import KernelUnavailableError, PyquantError


def env() -> dict:
    """Backends that work here: CPU C++ (the SIMD level its kernels run at, the
    levels this CPU supports, PYQUANT_SIMD if set, the activation mode of the
    qmatmul kernels), CUDA C++ and its compiled arches, Triton, the device, and
    which kernels are GPU-verified."""
    from .ops.backends import cpu_activations
    from .ops.dispatch import registered, verified_kernels

    try:
        ext = _ext.load()
        simd_error = None
    except KernelUnavailableError as exc:  # PYQUANT_SIMD names a level this CPU lacks: say so, do not fail
        ext, simd_error = None, str(exc)
    info = {
        "pyquant": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_cxx": ext is not None,
        "cpu_simd": ext.simd_level() if ext is not None else simd_error,
        "cpu_simd_levels": _ext.simd_levels(),
        "cpu_avx512_bf16": bool(ext is not None and ext.simd_avx512_bf16()),
        "cpu_simd_emulated": _ext.simd_emulated(),
        "cpu_simd_forced": os.environ.get(_ext.SIMD_ENV),
        "cpu_activations": _activations(cpu_activations),
        "cpu_threads": torch.get_num_threads(),
        "cuda_cxx": bool(ext is not None and ext.cuda_compiled()),
        "cuda_arches": ext.cuda_arches() if ext is not None else [],
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "triton": _triton_version(),
        "verified_gpu_kernels": sorted(verified_kernels()),
        "kernels": {f"{op}/{backend}": names for (op, backend), names in sorted(registered().items())},
    }
    return info


def _activations(cpu_activations) -> str:
    try:
        return cpu_activations.current()
    except PyquantError as exc:  # a bad PYQUANT_CPU_ACTIVATIONS: report it, do not fail
        return str(exc)


def _triton_version():
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # a broken triton install must not break env()
        return f"unusable ({exc.__class__.__name__})"


def format_env(info: dict) -> str:
    width = max(len(k) for k in info)
    lines = []
    for k, v in info.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            for kk, vv in v.items():
                lines.append(f"  {kk:<{width}} {', '.join(vv)}")
        else:
            lines.append(f"{k:<{width}} {v}")
    return "\n".join(lines)
