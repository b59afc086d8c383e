"""Round-to-nearest: the calibration-free baseline for every format."""
from __future__ import annotations

import torch

from ..errors import ValueRangeError
from ..formats import GGUF, NF4, Int, QuantizedWeight


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
    wp = torch.zeros((n, ng * g), dtype=torch.float32, device=w.device)
    wp[:, :k] = w
    wg = wp.view(n, ng, g)
    finfo = torch.finfo(fmt.scale_dtype)
    if fmt.symmetric:
        absmax = wg.abs().amax(-1)
        scale = absmax / ((1 << (fmt.bits - 1)) - 1)
        zero = None
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / fmt.max_code
    if bool((scale > finfo.max).any()):
        raise ValueRangeError(
            f"weight range {float(scale.max()):.4g} per code overflows scale dtype {fmt.scale_dtype}; "
            "use scale_dtype=torch.float32"
        )
    # Quantize with the scale as it will be stored, so codes and scales agree.
    scale = scale.to(fmt.scale_dtype).to(torch.float32)
    # An all-zero group (or one whose scale underflowed) gets a harmless scale.
    scale = torch.where(scale > 0, scale, torch.full_like(scale, finfo.tiny if finfo.bits > 16 else 2.0**-14))
    if fmt.symmetric:
        zf = float(fmt.zero_point)
        q = torch.round(wg / scale.unsqueeze(-1)) + zf
    else:
        zero = torch.round(-lo / scale).clamp(0, fmt.max_code)
        q = torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    codes = q.clamp(0, fmt.max_code).to(torch.uint8).view(n, ng * g)[:, :k]
    return codes, scale, zero


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
