"""The pure-torch spec of W8A8: dynamic per-token int8 activations x per-channel int8 weights."""
from __future__ import annotations

from typing import List, Optional

import torch

from ...formats import Format, Int
from .linear import _named


def is_w8a8_format(fmt: Format) -> bool:
    """W8A8 takes Int(8, per-channel, symmetric) weights (codes with zero point 128)."""
    return isinstance(fmt, Int) and fmt.bits == 8 and fmt.group_size == -1 and fmt.symmetric and not fmt.act_order


def quantize_rows_int8(x: torch.Tensor):
    """Symmetric per-row int8 quantization of ``x`` (M, K), the spec of the
    activation quantizer of :func:`w8a8_matmul_reference`.

    In fp32: ``scale = max|x[m]| / 127`` and ``q = clamp(round_half_even(x / scale),
    -127, 127)``; a row of zeros gets ``scale = 0`` and ``q = 0``. Both divisions
    are true IEEE divisions of two tensors (never a multiply by a reciprocal),
    which is what kernels reproduce bit for bit. Returns ``(q int8 (M, K),
    scale fp32 (M,))``.
    """
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = amax / torch.full_like(amax, 127.0)
    q = torch.round(xf / scale)
    q = torch.where(scale > 0, q, torch.zeros_like(q)).clamp(-127, 127).to(torch.int8)
    return q, scale.squeeze(-1)


def w8a8_matmul_reference(
    x: torch.Tensor, qdata: List[torch.Tensor], fmt: Format, shape, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``y = x @ W_hat.T + bias`` the W8A8 way, for ``x`` (M, K).

    ``x`` is quantized per row (:func:`quantize_rows_int8`), multiplied with the
    signed weight codes ``code - 128`` in exact integer arithmetic (float64
    holds every partial sum exactly, and works on every device), and rescaled in
    fp32 as ``(float(acc) * x_scale[m]) * w_scale[n]``, then ``+ bias`` and cast
    to ``x.dtype``.
    """
    if not is_w8a8_format(fmt):
        raise NotImplementedError(f"W8A8 needs Int(8, per-channel, symmetric) weights, got {fmt.spec()}")
    n, k = shape
    t = _named(fmt, qdata, shape)
    wq = fmt.unpack_codes(t["qweight"], shape).to(torch.float64) - 128.0
    q, sx = quantize_rows_int8(x)
    acc = q.to(torch.float64) @ wq.T
    sw = t["scales"].to(torch.float32).reshape(n)
    y = acc.to(torch.float32) * sx.unsqueeze(1) * sw.unsqueeze(0)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
