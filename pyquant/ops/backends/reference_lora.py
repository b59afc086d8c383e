"""The QLoRA ops' spec as the "reference" backend (every format and device), and
their "dequant" kernels for accelerators: the dequantize kernel dispatch allows,
then the vendor GEMM in the activation dtype. The dequant kernels materialise
the weight (in the activation dtype); they are what an accelerator runs until a
GPU run verifies the Triton kernels, which do not."""
from __future__ import annotations

import torch

from ..dispatch import register_kernel
from ..reference import lora
from .reference import _accelerator, _always, dequant_matmul

register_kernel("lora_qmatmul", "reference", "any", _always)(lora.lora_qmatmul)
register_kernel("qmatmul_transposed", "reference", "any", _always)(lora.qmatmul_transposed)


@register_kernel("lora_qmatmul", "dequant", "any", _accelerator)
def dequant_lora_qmatmul(x, qdata, fmt, shape, bias, xa, lora_B, scale):
    return lora.add_lowrank_(dequant_matmul(x, qdata, fmt, shape, bias), xa, lora_B, scale)


@register_kernel("qmatmul_transposed", "dequant", "any", _accelerator)
def dequant_qmatmul_transposed(g, qdata, fmt, shape):
    n, k = shape
    return g @ torch.ops.pyquant.dequantize(qdata, fmt.spec(), n, k, g.dtype, "auto")
