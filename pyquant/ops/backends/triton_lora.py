"""The Triton kernels of the QLoRA ops (``pyquant.triton_kernels``): the base
matmul with the low-rank term in its epilogue, and the transposed product of
the backward, both decoding the packed weight in registers. Experimental like
every Triton kernel (reachable by ``kernel="triton"`` until a GPU run lists
their names in ``verified_kernels.json``)."""
from __future__ import annotations

from ..dispatch import register_kernel
from .triton import _supports_dequantize as _supports
from .triton import kernels


@register_kernel("lora_qmatmul", "triton", "any", _supports)
def lora_qmatmul(x, qdata, fmt, shape, bias, xa, lora_B, scale):
    return kernels().lora_qmatmul(x, qdata, fmt, shape, xa, lora_B, scale, bias)


@register_kernel("qmatmul_transposed", "triton", "any", _supports)
def qmatmul_transposed(g, qdata, fmt, shape):
    return kernels().qmatmul_transposed(g, qdata, fmt, shape)
