"""llama.cpp's k-quant quantizers (GGUF Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).

``kquant_quantize(w, GGUF("Q4_K"))`` writes the bytes llama.cpp's
``quantize_q4_K`` writes for the same fp32 weight: without an importance
matrix its ``quantize_row_q4_K_ref`` (``make_qkx2_quants`` scale/min search
per 32-weight sub-block, 6-bit sub-block scales), with one the
importance-weighted ``quantize_row_q4_K_impl`` (``make_qkx3_quants`` with
weights ``imatrix[k] * sqrt(sigma2 + w^2)``, then ``make_qp_quants`` for the
sub-block scales). The same holds for the other four types; the algorithms
are spelled out in ``pyquant.ops.reference.kquant`` (the pure-torch spec). The
compiled CPU kernel of the op ``kquant_quantize`` (csrc/cpu/kquant_quantize.cpp)
computes the same bytes far faster (a 4096x4096 weight in seconds rather than
minutes) and is used when available; tests check the two agree.

The importance matrix is one non-negative value per input channel (column of
``w``): llama.cpp's imatrix, the sum (or mean) of the squared activations
that channel sees over calibration tokens, see ``imatrix_from_activations``.
Only its relative values matter (up to fp32 rounding in the searches).

Exactness notes: llama.cpp built with FMA contraction (``-march=native`` on
x86, or aarch64) rounds some of its ``a*b + c`` once and so writes slightly
different bytes from its own plain-x86-64 build; this module matches the
un-contracted build. Blocks whose fp16 scale would overflow (weights beyond
about 2e6..1e7 depending on the type) raise ValueRangeError where llama.cpp
would store Inf (Q2_K from |weight| of about 1e6; the other types tolerate
more).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import DeviceError, FormatError, ShapeError, ValueRangeError
from ..formats import GGUF, QuantizedWeight
from ..formats.gguf_blocks import FP16_FIELDS, K_TYPES, QK_K, f16_field
from ..ops import solvers
from ..validation import check_finite, check_float, check_weight_2d

__all__ = ["kquant_quantize", "imatrix_from_activations", "K_TYPES"]


def imatrix_from_activations(x: torch.Tensor, imatrix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Accumulate an importance matrix: ``sum over tokens of x**2`` per input
    channel. ``x``: activations ``(..., K)`` entering the layer; ``imatrix``:
    a running ``(K,)`` fp32 sum to add to (e.g. over calibration batches).
    Accumulates in float64 and returns fp32 ``(K,)``."""
    check_float("activations", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ShapeError(f"activations must be (..., in_features), got shape {tuple(x.shape)}")
    check_finite("activations", x)
    s = x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0)
    if imatrix is not None:
        if tuple(imatrix.shape) != (x.shape[-1],):
            raise ShapeError(f"imatrix must have shape ({x.shape[-1]},), got {tuple(imatrix.shape)}")
        s = s + imatrix.detach().to(s.device, torch.float64)
    return s.to(torch.float32)


def _check_imatrix(imatrix, k: int, device) -> torch.Tensor:
    check_float("imatrix", imatrix)
    if imatrix.dim() != 1 or imatrix.shape[0] != k:
        raise ShapeError(f"imatrix must be 1-D with in_features={k} entries, got shape {tuple(imatrix.shape)}")
    if imatrix.device != device:
        raise DeviceError(f"imatrix is on {imatrix.device} but the weight is on {device}")
    check_finite("imatrix", imatrix)
    q = imatrix.detach().to(torch.float32)
    if bool((q < 0).any()):
        i = int((q < 0).nonzero()[0])
        raise ValueRangeError(f"imatrix must be >= 0 (sums of squared activations), got {float(q[i])} at index {i}")
    return q.contiguous()


def _check_fp16_fields(type_name: str, blocks: torch.Tensor, w: torch.Tensor) -> None:
    ts = blocks.shape[1] // (w.shape[1] // QK_K)
    b = blocks.reshape(-1, ts).to(torch.int32)
    for off in FP16_FIELDS[type_name]:
        h = f16_field(b, off)
        bad = ~torch.isfinite(h)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            nb = w.shape[1] // QK_K
            r, c = i // nb, (i % nb) * QK_K
            what = "overflows fp16 (max 65504)" if bool(torch.isinf(h[i])) else "is NaN (extreme imatrix values?)"
            raise ValueRangeError(
                f"GGUF {type_name}: block {i} (row {r}, columns {c}..{c + QK_K - 1}) needs a scale that {what}; "
                f"its largest |weight| is {float(w[r, c:c + QK_K].abs().max()):.6g}"
            )


def kquant_quantize(
    w: torch.Tensor, fmt: GGUF, imatrix: Optional[torch.Tensor] = None, *, kernel: str = "auto"
) -> QuantizedWeight:
    """Quantize a float weight ``(N, K)`` into GGUF k-quant blocks.

    ``fmt``: ``GGUF`` with type Q2_K, Q3_K, Q4_K, Q5_K or Q6_K; ``K`` must be a
    multiple of 256. ``imatrix``: optional ``(K,)`` non-negative per-channel
    importance (llama.cpp's ``quant_weights``); None gives llama.cpp's
    reference (no-imatrix) quantization. ``kernel``: "auto" picks the compiled
    CPU path when available, ``"reference"`` forces the pure-torch spec,
    ``"cpu"`` requires the compiled path. Either runs on the CPU whatever the
    weight's device. Returns a ``QuantizedWeight`` with ``blocks`` uint8
    ``(N, K/256 * type_size)`` on the weight's device.
    """
    check_weight_2d("weight", w)
    if not isinstance(fmt, GGUF):
        raise FormatError(f"kquant_quantize needs a GGUF format, got {type(fmt).__name__}")
    if fmt.type not in K_TYPES:
        raise FormatError(f"kquant_quantize handles the k-quant types {list(K_TYPES)}, got {fmt.type}")
    n, k = w.shape
    fmt.check_shape((n, k))
    check_finite("weight", w)
    qw = None if imatrix is None else _check_imatrix(imatrix, k, w.device)
    # Quantization is offline and its bytes are defined by fp32 CPU arithmetic:
    # a weight on another device is quantized on the CPU and its blocks moved back.
    device = w.device
    x = w.detach().to("cpu", torch.float32).contiguous()
    if qw is not None:
        qw = qw.cpu()
    with torch.no_grad():
        blocks = solvers.kquant_quantize(x, fmt, qw, kernel=kernel)
    _check_fp16_fields(fmt.type, blocks, x)
    return fmt.from_blocks(blocks.to(device), (n, k))
