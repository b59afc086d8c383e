"""Round-to-nearest: the calibration-free baseline for every format."""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import GGUF, NF4, Int, QuantizedWeight
from ..ops.primitives import fake_quant, group_params, pad_groups


def int_scales_zeros(w: torch.Tensor, fmt: Int, shrink: Optional[torch.Tensor] = None):
    """Codes uint8 (N, K), scales (N, G) and zeros (N, G) (None when symmetric)
    of RTN (``primitives.group_params``'s rule), the range of each group shrunk
    by ``shrink`` (N, G) where given (AWQ's clipping)."""
    n, k = w.shape
    g = fmt.group_size_for(k)
    wg = pad_groups(w.to(torch.float32), g)
    scale, zero = group_params(wg, fmt, shrink)
    q, _ = fake_quant(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), fmt.max_code)
    codes = q.to(torch.uint8).view(n, -1)[:, :k]
    return codes, scale, None if fmt.symmetric else zero


def rtn_int(w: torch.Tensor, fmt: Int, shrink: Optional[torch.Tensor] = None) -> QuantizedWeight:
    if fmt.act_order:
        raise ValueError("act_order needs a calibration method (GPTQ); RTN has no column order")
    codes, scale, zero = int_scales_zeros(w, fmt, shrink)
    return fmt.pack(codes, scale, zero)


def rtn(w: torch.Tensor, fmt) -> QuantizedWeight:
    """Quantize a float weight ``(N, K)`` (validated by the caller) with RTN."""
    w = w.to(torch.float32)
    if isinstance(fmt, Int):
        return rtn_int(w, fmt)
    if isinstance(fmt, NF4):
        from .rtn_nf4 import rtn_nf4

        return rtn_nf4(w, fmt)
    if isinstance(fmt, GGUF):
        from .rtn_gguf import rtn_gguf

        return rtn_gguf(w, fmt)
    raise NotImplementedError(f"RTN is not defined for {fmt!r}")
