"""Large-M CPU qmatmul: decoded panels of weight rows, each through torch's GEMM.

From a few hundred rows of x on, the product is compute-bound and torch's GEMM
(oneDNN / MKL, at the CPU's widest vectors) beats the C++ kernels; decoding a
weight once costs a few per cent of the GEMM there. The weight is decoded
``rows`` rows at a time (4 MiB of fp32 by default: it stays in the caches while
the GEMM reads it), never whole. Bias and the low-rank epilogue ride in each
panel's GEMM (``addmm``'s input), not in a second pass over y.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

PANEL_FLOATS = 1 << 20


def panel_matmul(x: torch.Tensor, n: int, k: int, decode: Callable[[int, int, torch.Tensor], None],
                 bias: Optional[torch.Tensor] = None, lora_xa: Optional[torch.Tensor] = None,
                 lora_b: Optional[torch.Tensor] = None, lora_scale: float = 0.0,
                 rows: Optional[int] = None) -> torch.Tensor:
    """y (M, N) fp32 = x (M, K) fp32 @ W.T (+ bias) (+ lora_scale * lora_xa @ lora_b.T);
    ``decode(n0, n1, out)`` writes rows [n0, n1) of W into ``out`` ((n1 - n0, K) fp32)."""
    rows = rows or max(1, min(n, PANEL_FLOATS // max(k, 1)))
    panel = torch.empty((min(rows, n), k), dtype=torch.float32)
    y = torch.empty((x.shape[0], n), dtype=torch.float32)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = panel[: n1 - n0]
        decode(n0, n1, w)
        c = None
        if lora_xa is not None:
            c = (lora_xa @ lora_b[n0:n1].T).mul_(lora_scale)
        if bias is not None:
            c = bias[n0:n1] if c is None else c.add_(bias[n0:n1])
        y[:, n0:n1] = x @ w.T if c is None else torch.addmm(c, x, w.T)
    return y
