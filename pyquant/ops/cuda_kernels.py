"""CUDA C++ kernels (pyquant._C built with PYQUANT_CUDA). Experimental until a
GPU run lists them in verified_kernels.json: reachable with kernel="cuda"."""
from __future__ import annotations

import torch

from .. import _ext
from ._dtypes import dtype_code, ptr
from .dispatch import register_kernel


def _cuda_ready(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    ext = _ext.load()
    return ext is not None and ext.cuda_compiled()


def _int_any(fmt, device, m):
    return fmt.family == "int" and not fmt.act_order and _cuda_ready(device)


@register_kernel("dequantize", "cuda", "cuda_int_dequantize", _int_any)
def int_dequantize(qdata, fmt, shape, dtype):
    n, k = shape
    t = dict(zip(fmt.tensor_specs(shape), qdata))
    out = torch.empty((n, k), dtype=dtype, device=qdata[0].device)
    stream = torch.cuda.current_stream(out.device).cuda_stream
    _ext.load().int_dequant_cuda(
        ptr(t["qweight"]), ptr(t["scales"]), ptr(t.get("zeros")), ptr(out), n, k, fmt.bits,
        fmt.group_size_for(k), dtype_code(fmt.scale_dtype), dtype_code(dtype), stream,
    )
    return out
