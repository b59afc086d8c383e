"""The pure-torch spec of the LoRA ops: ``lora_qmatmul`` and ``qmatmul_transposed``.

``lora_qmatmul`` is one layer of QLoRA's forward pass,
``y = x @ W_hat.T + scale * (x_lora @ A.T) @ B.T + bias``, where ``x_lora`` is
the input of the adapter path (``x`` itself, or ``x`` after dropout). The
low-rank input ``xa = x_lora @ A.T`` (M x r) is computed by the op before a
kernel runs (:func:`lowrank_input`) and returned next to ``y``: the backward
reuses it for ``grad_B`` instead of recomputing it.

``qmatmul_transposed`` is ``g @ W_hat``, the product with the weight that the
backward of any quantized linear needs for ``grad_x`` (reduced over N): kernels
compute it without materialising ``W_hat`` in float.

Both compute in fp32 and return the input's dtype, like ``qmatmul``; a float64
input is computed in float64 (``W_hat`` is exact in it), which is what lets
``torch.autograd.gradcheck`` test the autograd formulas on the spec.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ...formats import Format
from .linear import dequantize_fp32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lowrank_input(x_lora: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """``xa = x_lora @ A.T`` (M, r) in the input's dtype: r columns, a small
    product next to the layer's, which every backend shares."""
    return x_lora @ lora_A.t()


def lora_qmatmul(x: torch.Tensor, qdata: List[torch.Tensor], fmt: Format, shape, bias: Optional[torch.Tensor],
                 xa: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``x (M, K) @ W_hat.T + scale * xa (M, r) @ B.T + bias`` -> (M, N) in x's dtype."""
    cdt = compute_dtype(x.dtype)
    w = dequantize_fp32(fmt, qdata, shape).to(cdt)
    y = x.to(cdt) @ w.T + scale * (xa.to(cdt) @ lora_B.to(cdt).T)
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(x.dtype)


def add_lowrank_(y: torch.Tensor, xa: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``y += scale * xa @ B.T`` in place (y (M, N) in its own dtype): the
    low-rank term added after a base kernel that has no epilogue for it."""
    return y.addmm_(xa.to(y.dtype), lora_B.to(y.dtype).t(), alpha=scale)


def qmatmul_transposed(g: torch.Tensor, qdata: List[torch.Tensor], fmt: Format, shape) -> torch.Tensor:
    """``g (M, N) @ W_hat`` -> (M, K) in g's dtype."""
    cdt = compute_dtype(g.dtype)
    w = dequantize_fp32(fmt, qdata, shape).to(cdt)
    return (g.to(cdt) @ w).to(g.dtype)
