"""The pure-torch spec of every op: what each kernel is tested against.

``linear`` (dequantize, qmatmul, pack, unpack: the formats' own decode),
``w8a8``, ``lora`` (QLoRA's lora_qmatmul and qmatmul_transposed), and the solvers: ``gptq`` (the in-block update), ``hqq`` and
``hqq_integer_zero`` (HQQ's solvers), ``kquant`` (llama.cpp's k-quant
quantizers, byte for byte).
"""
from .linear import dequantize, dequantize_fp32, pack, qmatmul, unpack
from .w8a8 import is_w8a8_format, quantize_rows_int8, w8a8_matmul_reference

__all__ = [
    "dequantize", "dequantize_fp32", "qmatmul", "pack", "unpack",
    "is_w8a8_format", "quantize_rows_int8", "w8a8_matmul_reference",
]
