"""The op layer: every op as one ``torch.library`` op, its kernels chosen by one registry.

    pyquant.ops.qmatmul(x, qw)        pyquant.ops.dequantize(qw, dtype)
    pyquant.ops.pack / unpack         pyquant.ops.w8a8_matmul(x, qw)
    pyquant.ops.gptq_block_update / hqq_solve / hqq_solve_integer_zero / kquant_quantize

``library`` defines the ops, ``dispatch`` holds the registry, ``reference`` the
pure-torch spec of every op, ``backends`` the kernels of each backend and
``primitives`` the group scale/zero math the quantizers share.
"""
from ..formats.base import install_dequantizer
from . import backends  # noqa: F401  (registers every backend's kernels)
from .api import dequantize, pack, qmatmul, unpack, w8a8_matmul
from .dispatch import register_kernel, select_kernel
from .solvers import gptq_block_update, hqq_solve, hqq_solve_integer_zero, kquant_quantize

install_dequantizer(lambda qw, dtype, kernel: dequantize(qw, dtype, kernel=kernel))

__all__ = [
    "dequantize", "qmatmul", "pack", "unpack", "w8a8_matmul",
    "gptq_block_update", "hqq_solve", "hqq_solve_integer_zero", "kquant_quantize",
    "select_kernel", "register_kernel",
]
