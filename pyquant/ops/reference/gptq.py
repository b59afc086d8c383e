"""The pure-torch spec of GPTQ's in-block column update (op ``gptq_block_update``).

Every kernel of the op (C++ on the CPU, CUDA, Triton) is tested against
:func:`gptq_block_update_reference`; :func:`check_block_update_args` holds the
bounds every kernel relies on (the op checks them at its boundary).
"""
from __future__ import annotations

import math

import torch

from ...errors import ShapeError, ValueRangeError


def gptq_block_update_reference(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out):
    """Pure-torch spec of the in-block column loop.

    ``W`` (N, B) fp32 is updated in place (columns ``> i`` after column ``i``),
    ``Hinv`` (B, B) is the block of the upper Cholesky factor of ``H^-1``,
    ``scale``/``zero`` (N, n_groups) fp32 hold the parameters of the groups
    covering columns ``[start, stop)``: column ``i`` uses
    ``(i - start) // group_len``. Writes the codes (uint8) and the scaled errors
    ``(w - dq) / Hinv[i, i]`` of those columns to ``codes_out``/``err_out``
    (N, stop - start).
    """
    for i in range(start, stop):
        g = (i - start) // group_len
        s = scale[:, g]
        z = zero[:, g]
        w = W[:, i]
        q = (torch.round(w / s) + z).clamp(0, maxq)
        dq = (q - z) * s
        e = (w - dq) / Hinv[i, i]
        if i + 1 < W.shape[1]:
            W[:, i + 1 :].addr_(e, Hinv[i, i + 1 :], alpha=-1)
        codes_out[:, i - start] = q.to(torch.uint8)
        err_out[:, i - start] = e


def check_block_update_args(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out):
    dev = W.device
    for name, t in (("W", W), ("Hinv", Hinv), ("scale", scale), ("zero", zero), ("codes_out", codes_out),
                    ("err_out", err_out)):
        if t.device != dev:
            raise ShapeError(f"gptq_block_update: {name} is on {t.device}, W on {dev}")
        if t.dim() != 2:
            raise ShapeError(f"gptq_block_update: {name} must be 2-D, got shape {tuple(t.shape)}")
        if name != "codes_out" and t.dtype != torch.float32:
            raise ShapeError(f"gptq_block_update: {name} must be fp32, got {t.dtype}")
    n, b = W.shape
    cnt = stop - start
    if not 0 <= start <= stop <= b:
        raise ShapeError(f"gptq_block_update: need 0 <= start <= stop <= {b}, got start={start}, stop={stop}")
    if group_len < 1 or not 1 <= maxq <= 255:
        raise ValueRangeError(f"gptq_block_update: group_len={group_len} must be >= 1, maxq={maxq} in [1, 255]")
    ng = math.ceil(cnt / group_len)
    if Hinv.shape[0] < stop or Hinv.shape[1] != b:
        raise ShapeError(f"gptq_block_update: Hinv {tuple(Hinv.shape)} must have {b} columns and >= {stop} rows")
    for name, t, cols in (("scale", scale, ng), ("zero", zero, ng), ("codes_out", codes_out, cnt),
                          ("err_out", err_out, cnt)):
        if t.shape[0] != n or t.shape[1] < cols:
            raise ShapeError(f"gptq_block_update: {name} {tuple(t.shape)} must be ({n}, >= {cols})")
    if codes_out.dtype != torch.uint8:
        raise ShapeError(f"gptq_block_update: codes_out must be uint8, got {codes_out.dtype}")
    if W.stride(1) != 1 or codes_out.stride(1) != 1 or err_out.stride(1) != 1:
        raise ShapeError("gptq_block_update: W, codes_out and err_out must have unit column stride")
