"""The low-rank epilogue arguments of the CPU qmatmul kernels (Int, NF4), which
QLoRA's ``lora_qmatmul`` (cpu_lora.py) uses.

``y += scale * xa @ b.T`` with ``xa`` (M, r) = x @ A.T computed by the caller
and ``b`` (N, r) the LoRA B matrix, both fp32: the C++ kernels add it to each
tile of y while the tile is in cache (csrc/cpu/lora_epilogue.h).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ...errors import DeviceError, DtypeError, ShapeError


def lora_args(xa: Optional[torch.Tensor], b: Optional[torch.Tensor], scale: float, m: int, n: int
              ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], int, float]:
    """Checked, contiguous (xa, b, rank, scale); (None, None, 0, 0.0) for no epilogue."""
    if xa is None and b is None:
        return None, None, 0, 0.0
    if xa is None or b is None:
        raise ShapeError(f"the low-rank epilogue needs both lora_xa and lora_b, got "
                         f"lora_xa={'None' if xa is None else tuple(xa.shape)}, "
                         f"lora_b={'None' if b is None else tuple(b.shape)}")
    for name, t in (("lora_xa", xa), ("lora_b", b)):
        if not isinstance(t, torch.Tensor):
            raise DtypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise DtypeError(f"{name} must be float32, got {t.dtype}")
        if t.device.type != "cpu":
            raise DeviceError(f"{name} must be on the CPU, got {t.device}")
        if t.dim() != 2:
            raise ShapeError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    r = xa.shape[1]
    if tuple(xa.shape) != (m, r) or tuple(b.shape) != (n, r):
        raise ShapeError(f"lora_xa must be (M={m}, r) and lora_b (N={n}, r) with the same r, got "
                         f"{tuple(xa.shape)} and {tuple(b.shape)}")
    scale = float(scale)
    if r == 0 or scale == 0.0:
        return None, None, 0, 0.0
    return xa.contiguous(), b.contiguous(), r, scale
