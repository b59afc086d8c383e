"""The pure-torch reference as a backend that takes every op, on any device,
and the "dequant" backend: on accelerators, the fastest dequantize kernel
dispatch allows followed by the vendor GEMM (cuBLAS) in the activation dtype,
the path of choice at large M where a fused kernel has nothing to win."""
from __future__ import annotations

import dataclasses

import torch

from ..dispatch import register_kernel
from ..reference import gptq, hqq, hqq_integer_zero, kquant, linear, w8a8

# Super-blocks per call of the k-quant spec: bounds its (n, G) temporaries.
KQUANT_CHUNK = 4096


def _always(fmt, device, m):
    return True


def _code_format(fmt, device, m):
    return fmt.family in ("int", "nf4")


def _w8a8_format(fmt, device, m):
    return w8a8.is_w8a8_format(fmt)


register_kernel("dequantize", "reference", "any", _always)(linear.dequantize)
register_kernel("qmatmul", "reference", "any", _always)(linear.qmatmul)
register_kernel("pack", "reference", "any", _code_format)(linear.pack)
register_kernel("unpack", "reference", "any", _code_format)(linear.unpack)
register_kernel("w8a8_matmul", "reference", "int8", _w8a8_format)(w8a8.w8a8_matmul_reference)
register_kernel("gptq_block_update", "reference", "int", _always)(gptq.gptq_block_update_reference)


@register_kernel("hqq_solve", "reference", "int", _always)
def hqq_solve(w, bits, group, scale_dtype, iters, lp_norm, beta, kappa, early_stop):
    sol = hqq.hqq_solve_reference(w, bits, group, scale_dtype, iters=iters, lp_norm=lp_norm, beta=beta,
                                  kappa=kappa, early_stop=early_stop)
    return dataclasses.astuple(sol)


@register_kernel("hqq_solve_integer_zero", "reference", "int", _always)
def hqq_solve_integer_zero(w, bits, group, scale_dtype, zero_slack, iters, lp_norm, beta, kappa, early_stop):
    sol = hqq_integer_zero.hqq_solve_integer_zero(w, bits, group, scale_dtype, zero_slack=zero_slack, iters=iters,
                                                  lp_norm=lp_norm, beta=beta, kappa=kappa, early_stop=early_stop)
    return dataclasses.astuple(sol)


def _cpu(fmt, device, m):
    return device.type == "cpu"


@register_kernel("kquant_quantize", "reference", "gguf", _cpu)
def kquant_quantize(x, fmt, imatrix):
    n, k = x.shape
    nb = k // kquant.QK_K
    xb = x.view(n * nb, kquant.QK_K)
    qb = None if imatrix is None else imatrix.view(1, nb, kquant.QK_K).expand(n, nb, kquant.QK_K).reshape(-1, kquant.QK_K)
    parts = [kquant.quantize_k_blocks(fmt.type, xb[s:s + KQUANT_CHUNK], None if qb is None else qb[s:s + KQUANT_CHUNK])
             for s in range(0, n * nb, KQUANT_CHUNK)]
    return torch.cat(parts).view(n, -1)


def _accelerator(fmt, device, m):
    return device.type != "cpu"


@register_kernel("qmatmul", "dequant", "any", _accelerator)
def dequant_matmul(x, qdata, fmt, shape, bias):
    n, k = shape
    w = torch.ops.pyquant.dequantize(qdata, fmt.spec(), n, k, x.dtype, "auto")
    y = x @ w.T
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
