"""CUDA C++ kernels (pyquant._C built with PYQUANT_CUDA). Experimental until a
GPU run lists them in verified_kernels.json: reachable with kernel="cuda".

Every wrapper allocates its outputs with torch (sizes fixed by the shapes, so
CUDA-graph capture works), launches on torch's current stream of the tensors'
device, and never synchronizes. Kernel names are stable: verified_kernels.json,
the GPU tests (``test_<kernel name>_*``) and the benchmarks refer to them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

from ... import _ext
from ...errors import ShapeError
from ...formats.base import named_packed
from .. import _dtypes, kernel_sources
from .._dtypes import dtype_code, ptr
from ..dispatch import register_kernel

GEMV_MAX_M = 8  # the INT4 GEMV serves M in [0, 8]; larger M belongs to a GEMM


def _ext_ready(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    ext = _ext.load()
    return ext is not None and ext.cuda_compiled()


def _raw_stream(index: int) -> int:
    try:
        return torch._C._cuda_getCurrentRawStream(index)
    except AttributeError:  # a torch without the private accessor
        return torch.cuda.current_stream(index).cuda_stream


@dataclasses.dataclass
class CudaRuntime:
    """The device calls of this backend's host path, in one place: whether CUDA
    kernels can take tensors of a device, torch's current raw stream on a device
    index, the current device (read, set) and a device's compute capability.
    The host-path benchmark and tests replace it to run every other line on the
    CPU (benchmarks/_host_stubs.py)."""

    ready: Callable[[torch.device], bool] = _ext_ready
    stream: Callable[[int], int] = _raw_stream
    current_device: Callable[[], int] = lambda: torch._C._cuda_getDevice()  # noqa: E731
    set_device: Callable[[int], None] = lambda index: torch._C._cuda_setDevice(index)  # noqa: E731
    capability: Callable[[int], tuple] = lambda index: torch.cuda.get_device_capability(index)  # noqa: E731


RUNTIME = CudaRuntime()


def cuda_ready(device: torch.device) -> bool:
    return RUNTIME.ready(device)


@functools.lru_cache(maxsize=None)
def capability(index: int) -> tuple:
    """Compute capability of device ``index``, read once (sm_90a code runs on 9.0 only)."""
    return tuple(RUNTIME.capability(index))


def _packed(fmt, qdata, shape, device: torch.device) -> dict:
    return named_packed(fmt, qdata, shape, device)


def _check_x(x: torch.Tensor, k: int, bias) -> None:
    if x.dim() != 2 or x.shape[1] != k or not x.is_contiguous():
        raise ShapeError(f"x must be a contiguous (M, {k}) tensor, got {tuple(x.shape)}")
    if bias is not None and (bias.device != x.device or bias.dim() != 1):
        raise ShapeError(f"bias must be 1-D on {x.device}, got {tuple(bias.shape)} on {bias.device}")


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous with a 16-byte aligned start (vector loads / cp.async need it).

    Tensors from torch's allocator are aligned; a view at an odd offset (a
    slice of a bigger buffer) is copied once into a fresh allocation.
    """
    t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


def _opt_code(t) -> int:
    return 0 if t is None else dtype_code(t.dtype)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else RUNTIME.current_device()


def launch_on(index: int, fn, *args) -> None:
    """``fn(*args, stream)`` with device ``index`` current and torch's current
    stream of that device (read at each launch: capture may run on a side stream).

    ``args`` are raw pointers and sizes: the caller keeps the tensors behind
    them alive until this returns (the launch is then enqueued on the stream).
    """
    rt = RUNTIME
    prev = rt.current_device()
    if prev == index:
        fn(*args, rt.stream(index))
        return
    rt.set_device(index)
    try:
        fn(*args, rt.stream(index))
    finally:
        rt.set_device(prev)


def launch(dev: torch.device, entry: str, *args) -> None:
    """``_C.<entry>(*args, stream)`` on ``dev`` and its current torch stream."""
    launch_on(_index(dev), getattr(_ext.load(), entry), *args)


def _dequant_out(qdata, fmt, shape, dtype) -> tuple[dict, torch.Tensor]:
    """The named packed tensors and the (N, K) output of a dequantize kernel."""
    n, k = shape
    dev = qdata[0].device
    return _packed(fmt, qdata, shape, dev), torch.empty((n, k), dtype=dtype, device=dev)


def _matmul_out(x, qdata, fmt, shape, bias) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """Checks ``x``/``bias`` of a qmatmul-like kernel; returns the named packed
    tensors, the (M, N) output in ``x.dtype`` and ``bias`` made contiguous."""
    n, k = shape
    _check_x(x, k, bias)
    t = _packed(fmt, qdata, shape, x.device)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    if bias is not None:
        bias = bias.contiguous()
    return t, out, bias


# --- Int: dequantize ---------------------------------------------------------
def _int_any(fmt, device, m):
    return fmt.family == "int" and not fmt.act_order and cuda_ready(device)


def _src(*files):
    return lambda: (kernel_sources.CSRC, kernel_sources.cuda_sources(*files))


@register_kernel("dequantize", "cuda", "int", _int_any, sources=_src("int_dequant.cu"))
def int_dequantize(qdata, fmt, shape, dtype):
    n, k = shape
    t, out = _dequant_out(qdata, fmt, shape, dtype)
    qweight = _aligned16(t["qweight"])  # 128-bit chunk loads; held until the launch is enqueued
    launch(
        out.device, "int_dequant_cuda",
        ptr(qweight), ptr(t["scales"]), ptr(t.get("zeros")), ptr(out), n, k, fmt.bits,
        fmt.group_size_for(k), dtype_code(fmt.scale_dtype), dtype_code(dtype),
    )
    return out


# --- Int4: GEMV for M <= 8 -----------------------------------------------------
def _int4_gemv_ok(fmt, device, m):
    return (
        fmt.family == "int"
        and fmt.bits == 4
        and not fmt.act_order
        and 0 <= m <= GEMV_MAX_M
        and cuda_ready(device)
    )


def int4_gemv_plan(qdata, fmt, shape, device: torch.device, m: int):
    """Launch plan of the GEMV for one weight: checked tensors, the 16-byte
    aligned qweight, pointers and sizes fixed once; a call allocates the output
    and launches (ops/plans.py)."""
    n, k = shape
    t = _packed(fmt, qdata, shape, device)
    qweight = _aligned16(t["qweight"])  # kept alive by this closure
    scales, zeros = t["scales"], t.get("zeros")
    weight = (ptr(qweight), ptr(scales), ptr(zeros))
    sizes = (n, k, fmt.group_size_for(k), dtype_code(fmt.scale_dtype))
    entry = getattr(_ext.load(), "int4_gemv_cuda")
    index = _index(device)
    codes = _dtypes.DTYPE_CODES

    def run(x, bias):
        rows = x.shape[0]
        out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
        if rows:
            b = None if bias is None else bias.contiguous()  # alive until the launch is enqueued
            launch_on(index, entry, x.data_ptr(), *weight, ptr(b), out.data_ptr(), rows, *sizes,
                      0 if b is None else codes[b.dtype], codes[x.dtype])
        return out

    run.keep = (qweight, scales, zeros)
    return run


@register_kernel("qmatmul", "cuda", "int4", _int4_gemv_ok, tag="gemv", plan=int4_gemv_plan,
                 sources=_src("int4_gemv.cu"))
def int4_gemv(x, qdata, fmt, shape, bias):
    """x (M, K) fp16/bf16/fp32 contiguous, M <= 8 -> (M, N) in x.dtype."""
    _check_x(x, shape[1], bias)
    return int4_gemv_plan(qdata, fmt, shape, x.device, x.shape[0])(x, bias)


# --- NF4 and GGUF: dequantize --------------------------------------------------
def _nf4_ok(fmt, device, m):
    return fmt.family == "nf4" and cuda_ready(device)


_DYN_MAPS: dict = {}


def _dynamic_map(device: torch.device) -> torch.Tensor:
    """bitsandbytes' 256-entry map on ``device``, copied there once (the first
    double-quantized dequantize on a device must run outside CUDA-graph capture)."""
    key = (device.type, device.index)
    table = _DYN_MAPS.get(key)
    if table is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "NF4 double-quant dequantize on CUDA: call it once before CUDA-graph capture "
                "(its lookup table is copied to the device on first use)"
            )
        from ...formats.nf4 import dynamic_map

        table = dynamic_map(device).contiguous()
        _DYN_MAPS[key] = table
    return table


@register_kernel("dequantize", "cuda", "nf4", _nf4_ok, sources=_src("nf4_dequant.cu"))
def nf4_dequantize(qdata, fmt, shape, dtype):
    n, k = shape
    t, out = _dequant_out(qdata, fmt, shape, dtype)
    dev = out.device
    if fmt.double_quant:
        scales = (0, ptr(t["absmax_q"]), ptr(t["absmax_scale"]), ptr(t["absmax_offset"]), ptr(_dynamic_map(dev)))
    else:
        scales = (ptr(t["absmax"]), 0, 0, 0, 0)
    qweight = _aligned16(t["qweight"])  # 128-bit chunk loads; held until the launch is enqueued
    launch(dev, "nf4_dequant_cuda", ptr(qweight), *scales, ptr(out), n * k, fmt.block_size, dtype_code(dtype))
    return out


def _gguf_ok(fmt, device, m):
    return fmt.family == "gguf" and cuda_ready(device)


@register_kernel("dequantize", "cuda", "gguf", _gguf_ok, sources=_src("gguf_dequant.cu"))
def gguf_dequantize(qdata, fmt, shape, dtype):
    n, k = shape
    t, out = _dequant_out(qdata, fmt, shape, dtype)
    bt = fmt.block
    launch(
        out.device, "gguf_dequant_cuda",
        ptr(t["blocks"]), ptr(out), n * (k // bt.block_size), bt.ggml_type, dtype_code(dtype),
    )
    return out
