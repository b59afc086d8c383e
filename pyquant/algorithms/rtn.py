"""Round-to-nearest: the calibration-free baseline for every format."""
from __future__ import annotations

import torch

from ..formats import GGUF, NF4, Int, QuantizedWeight
from .int_grid import group_params, pad_groups


def int_scales_zeros(w: torch.Tensor, fmt: Int):
    """Per-group (scales, zeros) for RTN in the stored dtype, and the codes.

    Asymmetric groups span ``[min(w, 0), max(w, 0)]`` (GPTQ's convention: 0.0 is
    exactly representable and zero-padding a ragged last group changes nothing);
    zero points are integers. Symmetric groups use ``absmax / (2**(bits-1) - 1)``
    so both +absmax and -absmax are representable.
    Returns codes uint8 (N, K), scales (N, G), zeros (N, G) or None.
    """
    n, k = w.shape
    g = fmt.group_size_for(k)
    ng = fmt.num_groups(k)
    wg = pad_groups(w.to(torch.float32), g)
    scale, zero = group_params(wg, fmt)
    q = torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    codes = q.clamp(0, fmt.max_code).to(torch.uint8).view(n, ng * g)[:, :k]
    return codes, scale, None if fmt.symmetric else zero


def rtn_int(w: torch.Tensor, fmt: Int) -> QuantizedWeight:
    if fmt.act_order:
        raise ValueError("act_order needs a calibration method (GPTQ); RTN has no column order")
    codes, scale, zero = int_scales_zeros(w, fmt)
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
