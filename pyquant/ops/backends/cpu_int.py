"""CPU C++ kernels for the int formats: thin wrappers over pyquant._C.

The C++ side (csrc/cpu/int_*.cpp, csrc/cpu/q8_*.cpp) takes raw pointers to
contiguous tensors and trusts its arguments; everything it relies on is made
true here. The exact kernels compute in fp32: fp16/bf16 activations are
widened inside the kernel (exactly) and the result is cast back to their
dtype, as the reference does. With int8 activations (``cpu_activations``: by
default for fp16 / bf16 x below the row count it gives for the SIMD level,
exact for fp32 x) x is quantized per 32-block, in two int8 planes, inside the
kernel instead. The exception: 4-bit weights with bf16 x on a CPU with
AVX512-BF16 take the exact path at every M, whose kernel up to 64 rows
multiplies the bf16 values directly (csrc/cpu/int4_bf16.cpp).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ... import _ext
from ...errors import FormatError, ValueRangeError
from ...formats.base import named_packed
from .._dtypes import dtype_code, ptr
from ..dispatch import register_kernel
from ..plans import out_like
from . import cpu_activations
from .cpu_lowrank import lora_args
from .cpu_panels import panel_matmul, torch_gemm_panels

_CPU = torch.device("cpu")


def _supports(fmt, device, m) -> bool:
    """Every Int format (2, 3, 4 and 8 bits, any group size) on the CPU, once
    the extension loads; otherwise the reference takes over."""
    return getattr(fmt, "family", None) == "int" and device.type == "cpu" and _ext.load() is not None


def _named(fmt, qdata: List[torch.Tensor], shape) -> dict:
    return named_packed(fmt, qdata, tuple(shape), _CPU)


def _weight_args(fmt, t: dict, shape):
    """Positional arguments describing the packed weight to the C++ entry points."""
    n, k = shape
    return (ptr(t["qweight"]), ptr(t["scales"]), ptr(t.get("zeros")), n, k, fmt.bits, fmt.group_size,
            dtype_code(fmt.scale_dtype))


def _checked_perm(t: dict, k: int) -> Optional[torch.Tensor]:
    perm = t.get("perm")
    if perm is None or perm.numel() == 0:
        return perm
    # The C++ scatter trusts perm: an index outside [0, K) must stop here.
    lo, hi = int(perm.min()), int(perm.max())
    if lo < 0 or hi >= k:
        raise ValueRangeError(f"act_order perm must hold column indices in [0, {k - 1}], got range [{lo}, {hi}]")
    return perm


def _perm_ptr(perm: Optional[torch.Tensor]) -> int:
    """act_order's int32 perm for the C++ matmul, which gathers x's columns into
    packed order itself (packed column j takes x's column perm[j]); 0 = none."""
    return 0 if perm is None or perm.numel() == 0 else perm.data_ptr()


def _dequantize_fp32(t: dict, fmt, shape, perm: Optional[torch.Tensor]) -> torch.Tensor:
    C = _ext.load()
    n, k = shape
    out = torch.empty((n, k), dtype=torch.float32)
    qw, s, z, n_, k_, bits, gs, sd = _weight_args(fmt, t, shape)
    C.int_dequantize(qw, s, z, ptr(perm), n_, k_, bits, gs, sd, out.data_ptr(), torch.get_num_threads())
    return out


@register_kernel("dequantize", "cpu", "int", _supports)
def dequantize(qdata: List[torch.Tensor], fmt, shape, dtype: torch.dtype) -> torch.Tensor:
    t = _named(fmt, qdata, shape)
    out = _dequantize_fp32(t, fmt, shape, _checked_perm(t, shape[1]))
    return out if dtype == torch.float32 else out.to(dtype)


@register_kernel("unpack", "cpu", "int", _supports)
def unpack(packed: torch.Tensor, fmt, shape) -> torch.Tensor:
    C = _ext.load()
    n, k = shape
    tshape, dtype = fmt.tensor_specs(tuple(shape))["qweight"]
    if packed.dtype != dtype or tuple(packed.shape) != tuple(tshape):
        raise FormatError(
            f"{fmt.spec()} packed codes for shape {tuple(shape)} must be {dtype} {tuple(tshape)}, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    packed = packed.contiguous()
    out = torch.empty((n, k), dtype=torch.uint8)
    C.int_unpack(packed.data_ptr(), n, k, fmt.bits, out.data_ptr(), torch.get_num_threads())
    return out


def qmatmul_plan(qdata, fmt, shape, device: torch.device, m: int):
    """Launch plan of the C++ kernels for one weight (ops/plans.py): the packed
    tensors named, act_order's perm checked and the weight's arguments computed
    once; a call then only allocates y and launches. The low-rank epilogue takes
    the full function."""
    C = _ext.load()
    n, k = shape
    t = _named(fmt, qdata, shape)
    perm = _perm_ptr(_checked_perm(t, k))
    weight = (ptr(t["qweight"]), ptr(t["scales"]), ptr(t.get("zeros")))
    layout = (fmt.bits, fmt.group_size, dtype_code(fmt.scale_dtype))
    qlist = list(qdata)
    use_int8 = cpu_activations.use_int8

    def run(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:  # x (..., K), contiguous
        dtype, xs = x.dtype, x.shape
        rows = x.numel() // k
        int8 = use_int8("int", dtype, rows, fmt.bits)
        if rows == 0 or torch_gemm_panels(rows):
            return qmatmul(x.reshape(-1, k), qlist, fmt, shape, bias).reshape(*xs[:-1], n)
        bf = None if bias is None else bias.to(torch.float32).contiguous()
        # (sizes as arguments: a tuple costs ~0.3 us more a call)
        # y in x's dtype, rounded from the fp32 result by the C++ entry point (csrc/cpu/half_output.h)
        y = torch.empty(xs[0], n, dtype=dtype) if len(xs) == 2 else out_like(xs, n, dtype)
        code = dtype_code(dtype)
        C.int_qmatmul(x.data_ptr(), code, rows, *weight, ptr(bf), n, k, *layout, y.data_ptr(),
                      torch.get_num_threads(), 0, 0, 0, 0.0, int8, perm, code)
        return y

    run.takes_nd = True

    run.keep = t  # the tensors behind ``weight``'s pointers (a contiguous copy where qdata's was not)
    return run


@register_kernel("qmatmul", "cpu", "int", _supports, plan=qmatmul_plan)
def qmatmul(
    x: torch.Tensor, qdata: List[torch.Tensor], fmt, shape, bias: Optional[torch.Tensor],
    lora_xa: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None, lora_scale: float = 0.0,
) -> torch.Tensor:
    """Fused ``x @ W_hat.T + bias`` for every bit width: a streaming GEMV for
    M <= 8, a tiled GEMM above (decoded tiles of W, never the whole weight, x
    in blocks of 256 rows that stay in L2; at the avx512 level the
    outer-product tile of csrc/cpu/panel_gemm.h: from M = 128 to 2048 it
    measured 2.1-3.3x torch's fp32 GEMM on the dequantized 4096 x 4096 weight,
    every bit width, 2 threads; the ymm tiles 1.05-1.17x, decoded panels
    through that GEMM 0.95-1.01x; those panels from SCALAR_PANEL_MIN_M rows at
    the scalar level and from YMM_PANEL_MIN_M at avx2 / avxvnni, cpu_panels.py);
    for 4-bit weights and bf16 x on a CPU with
    AVX512-BF16, up to 64 rows, ``vdpbf16ps`` on the codes (csrc/cpu/int4_bf16.cpp:
    exact products, fp32 sums); with int8
    activations (``cpu_activations``) the integer-dot kernels at every M. x
    may be fp32, fp16 or bf16 (read by the kernel); the fp32 result is cast to
    x's dtype, as the reference does.

    Low-rank epilogue (QLoRA): with ``lora_xa`` (M, r) = x @ A.T and ``lora_b``
    (N, r), both fp32, the kernel adds ``lora_scale * lora_xa @ lora_b.T`` to
    each tile of y it has just written (no second pass over y). None (or a
    zero scale) means none."""
    C = _ext.load()
    n, k = shape
    t = _named(fmt, qdata, shape)
    m = x.shape[0]
    perm = _checked_perm(t, k)
    bf = None if bias is None else bias.to(torch.float32).contiguous()
    xa, b, rank, scale = lora_args(lora_xa, lora_b, lora_scale, m, n)
    int8 = cpu_activations.use_int8("int", x.dtype, m, fmt.bits)
    if not int8 and torch_gemm_panels(m):
        y = panel_matmul(x.to(torch.float32).contiguous(), n, k, row_decoder(t, fmt, k, perm), bf, xa, b, scale)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype)  # rounded from the fp32 result in C++ (half_output.h)
    if m > 0:
        C.int_qmatmul(x.data_ptr(), dtype_code(x.dtype), m, ptr(t["qweight"]), ptr(t["scales"]), ptr(t.get("zeros")),
                      ptr(bf), n, k, fmt.bits, fmt.group_size, dtype_code(fmt.scale_dtype), y.data_ptr(),
                      torch.get_num_threads(), ptr(xa), ptr(b), rank, scale, int8, _perm_ptr(perm), dtype_code(y.dtype))
    return y


def row_decoder(t: dict, fmt, k: int, perm: Optional[torch.Tensor]):
    """decode(n0, n1, out): rows [n0, n1) of W_hat (logical column order) into out."""
    C = _ext.load()
    qw, s, z = t["qweight"], t["scales"], t.get("zeros")

    def decode(n0: int, n1: int, out: torch.Tensor) -> None:
        C.int_dequantize(ptr(qw[n0:n1]), ptr(s[n0:n1]), ptr(None if z is None else z[n0:n1]), ptr(perm), n1 - n0, k,
                         fmt.bits, fmt.group_size, dtype_code(fmt.scale_dtype), out.data_ptr(),
                         torch.get_num_threads())

    return decode
