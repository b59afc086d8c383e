"""The one registry of kernels, and the one place a backend is chosen.

Every op (``dequantize``, ``qmatmul``, ``pack``, ``unpack``, ``w8a8_matmul``,
the solvers' ``gptq_block_update``, ``hqq_solve``, ``hqq_solve_integer_zero``,
``kquant_quantize``, and QLoRA's ``lora_qmatmul`` and ``qmatmul_transposed``)
registers its kernels here with :func:`register_kernel`.
A kernel's name is ``<backend>_<format>_<op>`` plus a path tag where one
backend has several kernels for an op (``triton_any_qmatmul_gemv``): the name
``verified_kernels.json``, the GPU tests and the benchmarks refer to, and what
``pyquant env`` lists.

:func:`select_kernel` picks one by device, format and M (rows of activations),
or honours ``kernel=``, the same way for every op:

* ``"auto"``: on the CPU the C++ kernel, else the pure-torch reference; on an
  accelerator CUDA C++, then Triton, then dequantize + the vendor GEMM, then
  the reference. DESIGN.md rule 6 lives here: a CUDA or Triton kernel is chosen
  by default only when ``verified_kernels.json`` lists it (written from a GPU
  run's results); otherwise it is reachable only by name.
* a backend name (``"cpu"``, ``"cuda"``, ``"triton"``, ``"dequant"``,
  ``"reference"``): that backend's first kernel that takes the call, or
  KernelUnavailableError naming the op, format, weight shape, device and M;
* a kernel's name (``"cuda_int8_w8a8_matmul"``): that kernel, verified or not,
  or the same error when it cannot take the call (where a backend has several
  kernels for an op, the GPU tests name the one they test).

Verified means verified: an entry of ``verified_kernels.json`` records the
SHA-256 of the kernel's source (``kernel_sources``: the ``.cu`` file and its
headers, or the Triton modules the backend names) at its passing GPU run; an
entry whose source has changed since, or that records none, does not count.
The hashes are computed once per process, at the first default dispatch that
asks.

A kernel may also register a ``plan`` factory: ``plan(qdata, fmt, shape, device,
m)`` returns ``run(x2d, bias) -> y`` with everything that depends only on the
weight and the M bucket done once (pointers, sizes, launch configuration);
``pyquant.ops.plans`` caches them per weight.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import _ext
from ..errors import KernelUnavailableError
from . import kernel_sources

BACKENDS = ("cuda", "triton", "cpu", "dequant", "reference")
GPU_BACKENDS = ("cuda", "triton")
OPS = (
    "dequantize", "qmatmul", "pack", "unpack", "w8a8_matmul",
    "gptq_block_update", "hqq_solve", "hqq_solve_integer_zero", "kquant_quantize",
    "lora_qmatmul", "qmatmul_transposed",
)
_CPU_ORDER = ("cpu", "reference")
_ACCELERATOR_ORDER = ("cuda", "triton", "dequant", "reference")


@dataclasses.dataclass(frozen=True)
class Kernel:
    op: str
    backend: str
    format: str  # the formats it takes: "int", "int4", "int8", "nf4", "gguf", or "any"
    name: str  # <backend>_<format>_<op>[_<tag>]
    supports: Callable  # (fmt, device, m) -> bool
    fn: Callable
    plan: Optional[Callable] = None  # (qdata, fmt, shape, device, m) -> run(x2d, bias); see the module doc
    sources: Optional[Callable] = None  # () -> (root, files) the kernel is built from (GPU kernels)


_REGISTRY: Dict[Tuple[str, str], List[Kernel]] = {}


def kernel_name(op: str, backend: str, fmt: str, tag: str = "") -> str:
    return f"{backend}_{fmt}_{op}" + (f"_{tag}" if tag else "")


def register_kernel(op: str, backend: str, fmt: str, supports: Callable, tag: str = "", plan: Callable = None,
                    sources: Callable = None):
    """Decorator registering ``fn`` as ``backend``'s kernel for ``op`` on the
    formats ``fmt`` names; ``supports(fmt, device, m)`` says whether it takes a
    call (format details, device, the extension or Triton being there, M).
    ``plan``: an optional launch-plan factory (module doc); ``sources``: for GPU
    kernels, ``() -> (root, files)`` of their source. A CUDA kernel must name its
    own: hashing every CUDA file instead would make one kernel's edit unverify
    all the others."""
    if op not in OPS or backend not in BACKENDS:
        raise ValueError(f"unknown op/backend {op!r}/{backend!r}")
    if backend == "cuda" and sources is None:
        raise ValueError(f"CUDA kernel {kernel_name(op, backend, fmt, tag)!r} must name its sources")
    name = kernel_name(op, backend, fmt, tag)

    def deco(fn):
        kernels = _REGISTRY.setdefault((op, backend), [])
        if any(k.name == name for k in kernels):
            raise ValueError(f"kernel {name!r} is registered twice")
        kernels.append(Kernel(op, backend, fmt, name, supports, fn, plan, sources))
        return fn

    return deco


VERIFIED_FILE = Path(__file__).with_name("verified_kernels.json")


def kernel_by_name(name: str) -> Optional[Kernel]:
    for ks in _REGISTRY.values():
        for k in ks:
            if k.name == name:
                return k
    return None


def source_hash(name: str) -> Optional[str]:
    """SHA-256 of the source kernel ``name`` is built from today; None when the
    kernel is unknown or its source is not on disk."""
    k = kernel_by_name(name)
    if k is None:
        return None
    if k.sources is None:
        return None
    root, files = k.sources()
    return kernel_sources.files_hash(files, root)


def verified_entries(path: Optional[Path] = None) -> Dict[str, dict]:
    """{kernel name: {device, date, source_sha256}} as recorded by GPU runs."""
    try:
        data = json.loads(Path(path or VERIFIED_FILE).read_text())
    except FileNotFoundError:
        return {}
    return dict(data.get("kernels", {}))


@functools.lru_cache(maxsize=None)
def verified_kernels() -> frozenset:
    """Names of GPU kernels that passed the test suite on a real device *with
    today's source* (the recorded hash matches); computed once per process."""
    return frozenset(
        name for name, entry in verified_entries().items()
        if entry.get("source_sha256") and entry["source_sha256"] == source_hash(name)
    )


def _find(op: str, backend: str, fmt, device: torch.device, m: int):
    for k in _REGISTRY.get((op, backend), ()):
        if k.supports(fmt, device, m):
            return k
    return None


def _describe(fmt) -> str:
    return fmt.spec() if hasattr(fmt, "spec") else str(fmt)


def select_kernel(op: str, fmt, device: torch.device, m: int = 1, kernel: str = "auto", shape=None) -> Kernel:
    """The kernel of ``op`` for format ``fmt`` on ``device`` with M rows (``shape``,
    the weight's (N, K), only names it in errors)."""
    if kernel != "auto":
        what = f" weight {shape[0]}x{shape[1]}" if shape is not None else ""
        if kernel not in BACKENDS:
            named = kernel_by_name(kernel)
            if named is None or named.op != op:
                names = [k.name for k in kernels(op)]
                raise KernelUnavailableError(
                    f"kernel must be 'auto', one of {BACKENDS} or the name of a {op} kernel ({names}), got {kernel!r}")
            if not named.supports(fmt, device, m):
                raise KernelUnavailableError(
                    f"kernel {kernel!r} does not take format {_describe(fmt)}{what} on device {device} (M={m})")
            return named
        k = _find(op, kernel, fmt, device, m)
        if k is None:
            names = [k.name for k in _REGISTRY.get((op, kernel), ())] or "none registered"
            raise KernelUnavailableError(
                f"no {kernel!r} kernel for {op} takes format {_describe(fmt)}{what} on device {device} (M={m}); "
                f"{kernel} kernels of {op}: {names}"
            )
        return k
    if device.type == "cpu":
        order = _CPU_ORDER
        _ext.load()  # the first call that wants compiled kernels says once if they are missing
    else:
        order = _ACCELERATOR_ORDER
    for backend in order:
        for k in _REGISTRY.get((op, backend), ()):
            if not k.supports(fmt, device, m):
                continue
            if backend in GPU_BACKENDS and k.name not in verified_kernels():
                continue  # experimental until a GPU run has passed it: the next one may have
            return k
    what = f" weight {shape[0]}x{shape[1]}" if shape is not None else ""
    raise KernelUnavailableError(f"no kernel for {op} with format {_describe(fmt)}{what} on device {device}")


def registered() -> Dict[Tuple[str, str], List[str]]:
    """(op, backend) -> kernel names, for ``pyquant.env()``, benchmarks and tests."""
    return {key: [k.name for k in ks] for key, ks in _REGISTRY.items()}


def kernels(op: str = None) -> List[Kernel]:
    """Every registered kernel (of ``op``), in registration order."""
    return [k for (o, _), ks in _REGISTRY.items() if op in (None, o) for k in ks]
