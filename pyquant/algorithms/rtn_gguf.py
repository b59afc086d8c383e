"""Round-to-nearest quantizers of the legacy GGUF block types (the k-quant
types Q2_K..Q6_K go to llama.cpp's reference quantizers in ``kquant``).

They reproduce gguf-py's numpy quantizers (``gguf.quants.quantize``, which are
bit-exact with llama.cpp's ``quantize_row_*_ref``) byte for byte, so their
fp32 arithmetic is mirrored step by step:

* Q4_0/Q5_0: ``d = max / -8`` (``-16``) where ``max`` is the element of largest
  magnitude *with its sign* (the first one on ties), so that element maps to
  code 0 and the other end of the range gets the extra level;
  ``q = trunc(w * (1/d) + 8.5)`` (``16.5``), clipped to the code range.
* Q4_1/Q5_1: ``d = (max - min) / 15`` (``31``), ``m = min``;
  ``q = trunc((w - min) * (1/d) + 0.5)``, clipped. A zero max/min takes the
  sign of the block's last zero, as numpy's reductions do (llama.cpp's C loop
  keeps the first one instead; only the sign bit of a zero ``d``/``m`` differs).
* Q8_0: ``d = absmax / 127``; ``q`` = ``w * (1/d)`` rounded half away from
  zero (computed as ``floor(a) + floor(2 * (a - floor(a)))``, which is exact,
  unlike ``trunc(a + 0.5)``).

``1/d`` is an fp32 division and a zero ``d`` uses ``1/d = 0``; codes are
computed with the unrounded fp32 ``d`` and only the stored ``d``/``m`` are
rounded to fp16. Where ``1/d`` overflows (blocks whose range is below about
1e-37) the products are not finite; numpy then casts them to code 0 (x86) and
so do we; such a block stores ``d == 0`` anyway.

One deliberate difference: where the fp16 ``d`` or ``m`` would overflow to
Inf (block magnitudes above ~5e5 for Q4_0, ~8e6 for Q8_0), gguf-py stores Inf
and the weight dequantizes to Inf/NaN; we raise ValueRangeError instead, as
``rtn_int`` does for a scale that overflows its dtype.
"""
from __future__ import annotations

import torch

from ..errors import FormatError, ValueRangeError
from ..formats import GGUF, QuantizedWeight
from ..formats.gguf_blocks import K_TYPES

# (levels below zero for the symmetric types / code range for the asymmetric, max code)
_SYM = {"Q4_0": (8.0, 15), "Q5_0": (16.0, 31)}
_ASYM = {"Q4_1": (15.0, 15), "Q5_1": (31.0, 31)}


def _inverse(d: torch.Tensor) -> torch.Tensor:
    # An explicit fp32 division: Tensor.__rtruediv__ goes through reciprocal().
    inv = torch.ones_like(d) / d
    return torch.where(d == 0, torch.zeros_like(d), inv)


def _signed_zero_last(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v`` (a block min or max, ``(.., 1)``) with gguf-py's sign of zero: numpy's
    min/max reductions keep the later operand on ties, so where the extreme is
    a zero it carries the sign of the last zero in the block (this sets the sign
    bit of a zero ``m`` and, via ``max - min``, of a zero ``d``)."""
    pos = torch.arange(1, w.shape[-1] + 1, device=w.device, dtype=torch.int32)
    last = torch.where(w == 0, pos, torch.zeros_like(pos)).argmax(dim=-1, keepdim=True)
    return torch.where(v == 0, w.gather(-1, last), v)


def _codes(x: torch.Tensor, max_code: int) -> torch.Tensor:
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    return x.clamp(0, max_code).to(torch.int32)


def _check_fp16(type_name: str, name: str, v: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    h = v.to(torch.float16)
    bad = torch.isinf(h)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise ValueRangeError(
            f"GGUF {type_name}: block {i} (row {i // blocks.shape[1]}, columns "
            f"{(i % blocks.shape[1]) * 32}..{(i % blocks.shape[1]) * 32 + 31}) needs {name}="
            f"{float(v.reshape(-1)[i]):.6g}, which overflows fp16 (max 65504); its largest "
            f"|weight| is {float(blocks.reshape(-1, 32)[i].abs().max()):.6g}"
        )
    return h


def legacy_fields(w: torch.Tensor, type_name: str):
    """RTN of fp32 ``w`` ``(N, K)`` into a legacy type: ``(d, m, codes)`` as
    ``GGUF.pack`` takes them (``d``/``m`` fp16 ``(N, K/32)``)."""
    n, k = w.shape
    nb = k // 32
    wb = w.to(torch.float32).reshape(n, nb, 32)
    m = None
    if type_name in _SYM:
        levels, max_code = _SYM[type_name]
        imax = wb.abs().argmax(dim=-1, keepdim=True)
        mx = wb.gather(-1, imax)
        d = mx / -levels
        q = torch.trunc(wb * _inverse(d) + (levels + 0.5))
        codes = _codes(q, max_code)
    elif type_name in _ASYM:
        steps, max_code = _ASYM[type_name]
        mx = _signed_zero_last(wb, wb.amax(dim=-1, keepdim=True))
        mn = _signed_zero_last(wb, wb.amin(dim=-1, keepdim=True))
        d = (mx - mn) / steps
        q = torch.trunc((wb - mn) * _inverse(d) + 0.5)
        codes = _codes(q, max_code)
        m = _check_fp16(type_name, "m", mn.squeeze(-1), wb)
    elif type_name == "Q8_0":
        d = wb.abs().amax(dim=-1, keepdim=True) / 127.0
        x = wb * _inverse(d)
        a = x.abs()
        fl = torch.floor(a)
        r = torch.sign(x) * (fl + torch.floor(2.0 * (a - fl)))
        r = torch.where(torch.isfinite(r), r, torch.zeros_like(r))
        codes = r.clamp(-128, 127).to(torch.int32)
    else:
        raise FormatError(f"no legacy RTN quantizer for GGUF type {type_name!r}")
    d = _check_fp16(type_name, "d", d.squeeze(-1), wb)
    return d, m, codes.reshape(n, k)


def rtn_gguf(w: torch.Tensor, fmt: GGUF) -> QuantizedWeight:
    """Quantize fp32 ``w`` ``(N, K)`` (validated, K a multiple of the block
    size) into GGUF block bytes: gguf-py's round-to-nearest for the legacy
    types, llama.cpp's reference k-quant quantizers (``kquant.kquant_quantize``
    without an importance matrix) for Q2_K..Q6_K."""
    if fmt.type in K_TYPES:
        # The k-quants have no plain RTN in llama.cpp: their reference
        # quantizer (no importance matrix) is what "rtn" means for them.
        from .kquant import kquant_quantize

        return kquant_quantize(w, fmt)
    fmt.check_shape(tuple(w.shape))
    d, m, codes = legacy_fields(w, fmt.type)
    return fmt.pack(codes, d, m)
