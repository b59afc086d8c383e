"""Registers the pure-torch reference as a backend that supports everything,
and the "dequant" backend: on accelerators, the fastest dequantize kernel
dispatch allows followed by the vendor GEMM (cuBLAS) in the activation dtype,
the path of choice at large M where a fused kernel has nothing to win."""
from __future__ import annotations

from . import reference
from .dispatch import register_kernel


def _always(fmt, device, m):
    return True


def _code_format(fmt, device, m):
    return fmt.family in ("int", "nf4")


register_kernel("dequantize", "reference", "reference_dequantize", _always)(reference.dequantize)
register_kernel("qmatmul", "reference", "reference_qmatmul", _always)(reference.qmatmul)
register_kernel("pack", "reference", "reference_pack", _code_format)(reference.pack)
register_kernel("unpack", "reference", "reference_unpack", _code_format)(reference.unpack)


def _accelerator(fmt, device, m):
    return device.type != "cpu"


@register_kernel("qmatmul", "dequant", "dequant_matmul", _accelerator)
def dequant_matmul(x, qdata, fmt, shape, bias):
    import torch

    n, k = shape
    w = torch.ops.pyquant.dequantize(qdata, fmt.spec(), n, k, x.dtype, "auto")
    y = x @ w.T
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
