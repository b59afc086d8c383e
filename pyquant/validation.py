"""Boundary checks shared by the public functions (DESIGN.md rule 4)."""
from __future__ import annotations

import torch

from .errors import DeviceError, DtypeError, ShapeError, ValueRangeError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise DtypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    check_tensor(name, t)
    if t.dtype not in dtypes:
        raise DtypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_dtype_arg(name: str, dtype, dtypes=FLOAT_DTYPES) -> None:
    if dtype not in dtypes:
        raise DtypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {dtype!r}")


def check_same_device(name: str, t: torch.Tensor, device: torch.device, other: str) -> None:
    if t.device != device:
        raise DeviceError(f"{name} is on {t.device} but {other} is on {device}")


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueRangeError(f"{name} contains NaN or Inf (first at index {tuple(bad)}, value {t[tuple(bad)].item()})")


def check_weight_2d(name: str, w) -> None:
    check_float(name, w)
    if w.dim() != 2:
        raise ShapeError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ShapeError(f"{name} is empty: shape {tuple(w.shape)}")


def check_last_dim(name: str, t: torch.Tensor, size: int, what: str) -> None:
    """t (..., size): at least 1-D with ``size`` (the weight's ``what``) last."""
    if t.dim() == 0 or t.shape[-1] != size:
        raise ShapeError(f"{name} has shape {tuple(t.shape)}; its last dim must equal {what}={size}")


def check_matmul_inputs(x, n: int, k: int, device: torch.device, bias) -> None:
    """x (..., K) float on the weight's device; bias None or (N,) float on x's device."""
    check_float("x", x)
    check_last_dim("x", x, k, "in_features")
    check_same_device("x", x, device, "the quantized weight")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (n,):
            raise ShapeError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        check_same_device("bias", bias, x.device, "x")
