"""Pure-torch specification of llama.cpp's k-quant quantizers (Q2_K..Q6_K).

``quantize_k_blocks(type, x, qw)`` returns, byte for byte, what llama.cpp's
``quantize_qX_K`` writes for the same fp32 super-blocks: the ``*_ref`` path
(``make_qkx2_quants`` / ``make_q3_quants`` / ``make_qx_quants``) when ``qw`` is
None and the importance-weighted ``*_impl`` path (``make_qkx3_quants`` /
``make_qp_quants`` / weighted ``make_qx_quants``) when ``qw`` holds the
per-column importance.

Byte-exactness rests on doing llama.cpp's fp32 operations in llama.cpp's
order, so this file is written as a transcription of its scalar C loops,
vectorised *across* sub-blocks only:

* every sub-block quantity is a tensor ``(G,)`` over all sub-blocks, elements
  of a sub-block are the leading dim ``(n, G)`` so element ``i`` of every
  sub-block is one contiguous slice;
* reductions are sequential left-to-right fp32 sums (``_seqsum``), never
  torch's pairwise/vectorised ``sum``: the C loops accumulate one term at a
  time (a compiler keeps that order without -ffast-math);
* an expression ``w*x[i]*l`` is ``(w*x)*l``, ``a*b + c`` is two roundings:
  the reference is compiled for baseline x86-64, which has no FMA, so nothing
  is contracted;
* the candidate searches are sequential in the step (the running best
  ``min`` feeds the next step's ``iscale``), and the refinement loops of
  ``make_q3_quants`` / ``make_qp_quants`` are sequential in the element (each
  accepted change moves ``sumlx``/``suml2`` for the next element): those loops
  stay Python loops over a handful of steps/elements, each one op over all
  sub-blocks;
* ``nearest_int`` is the magic-number rounding itself (``bits(v + 1.5*2**23)``
  masked), which is round-half-to-even inside +-2**22 and defined garbage
  outside (reached only through degenerate ratios, and then clamped);
* integers stored into ``uint8``/``int8`` C variables wrap like C does
  (scale codes of odd blocks can be negative before the ``MIN(63, .)``);
* fp32 -> fp16 is round-to-nearest-even (``GGML_FP32_TO_FP16``), torch's cast.

Divisions are always tensor / tensor (``Tensor.__rtruediv__`` would go through
``reciprocal()``, a second rounding) and scalar constants are fp32 values
computed in fp32 (``np.float32``), as C computes ``rmin + rdelta*is + nmax``.

The matching llama.cpp source is ggml/src/ggml-quants.c (``make_qkx3_quants``
in its current form, which clamps ``v = iscale*(x - min)`` before rounding).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ...errors import FormatError
from ...formats.gguf_blocks import K_TYPES, QK_K, k4_scale_min, pack_k4_scales, pack_k_blocks, pack_q3_scales, q3_scale_values


_EPS = float(np.float32(1e-15))  # GROUP_MAX_EPS
_MAGIC = 12582912.0  # 1.5 * 2**23


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``nearest_int`` on fp32 ``v``, as fp32 integer values."""
    bits = (v + _MAGIC).view(torch.int32)
    return ((bits & 0x7FFFFF) - 0x400000).to(torch.float32)


def sqrt_rn(q: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 ``sqrtf`` of ``q >= 0``.

    torch's CPU fp32 ``sqrt`` is not correctly rounded (one ulp off for about
    a sixth of random inputs with this build), and one ulp in a weight flips
    llama.cpp's scale searches. The
    approximation is fixed up with exact float64 tests: the midpoint of two
    adjacent floats has 25 significant bits, its square 50, so ``mid*mid``
    against ``q`` is exact, and a float ``q`` is never a midpoint's square (no
    ties)."""
    r = torch.sqrt(q)
    q64 = q.double()
    inf = torch.full_like(r, float("inf"))
    for _ in range(2):
        up = torch.nextafter(r, inf)
        mid = (r.double() + up.double()) * 0.5
        r = torch.where(mid * mid < q64, up, r)
        dn = torch.nextafter(r, torch.zeros_like(r))
        mid = (r.double() + dn.double()) * 0.5
        r = torch.where((mid * mid > q64) & (r > 0), dn, r)
    return r


def _div(a, b: torch.Tensor) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    return torch.div(a, b)


def _seqsum(p: torch.Tensor) -> torch.Tensor:
    """``float s = 0; for i: s += p[i]`` over dim 0 of ``(n, G)``."""
    acc = p[0] + 0.0  # 0 + (-0.0) is +0.0, as in C
    for i in range(1, p.shape[0]):
        acc.add_(p[i])
    return acc


def _seqsum_from_first(p: torch.Tensor) -> torch.Tensor:
    """``float s = p[0]; for i >= 1: s += p[i]``."""
    acc = p[0].clone()
    for i in range(1, p.shape[0]):
        acc.add_(p[i])
    return acc


def _wrap_u8(v: torch.Tensor) -> torch.Tensor:
    """An int stored into a C ``uint8_t`` (float in, float out)."""
    return (v.to(torch.int32) & 0xFF).to(torch.float32)


def _wrap_i8(v: torch.Tensor) -> torch.Tensor:
    return (((v.to(torch.int32) + 128) & 0xFF) - 128).to(torch.float32)


def _first_absmax(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``amax``, ``max`` of ``for i: if (fabsf(x[i]) > amax) {amax = |x|; max = x}``
    from ``amax = max = 0``."""
    amax = torch.zeros_like(x[0])
    mx = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        ax = x[i].abs()
        upd = ax > amax
        amax = torch.where(upd, ax, amax)
        mx = torch.where(upd, x[i], mx)
    return amax, mx


def _running_max(x: torch.Tensor) -> torch.Tensor:
    """``m = 0; for i: if (x[i] > m) m = x[i]`` over dim 0."""
    m = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        m = torch.where(x[i] > m, x[i], m)
    return m


# --- the scale searches (x: (n, G) sub-blocks as columns) -------------------------
def make_qx_quants(x: torch.Tensor, nmax: int, qw: Optional[torch.Tensor]):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric scale with
    the -9..9 search. Returns (scale (G,), L (n, G) in 0..2*nmax-1)."""
    amax, mx = _first_absmax(x)
    zero = amax < _EPS
    w = qw if qw is not None else x * x
    wx = w * x
    lo, hi = float(-nmax), float(nmax - 1)

    def codes(iscale):
        return nearest_int(iscale * x).clamp_(lo, hi)

    def sums(l):
        return _seqsum(wx * l), _seqsum((w * l) * l)

    l = codes(_div(float(-nmax), mx))
    L = l + nmax
    sumlx, suml2 = sums(l)
    scale = torch.where(suml2 != 0, torch.div(sumlx, suml2), torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        c = np.float32(nmax) + np.float32(0.1) * np.float32(step)
        l = codes(_div(float(-c), mx))
        sumlx, suml2 = sums(l)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(upd, l + nmax, L)
        scale = torch.where(upd, torch.div(sumlx, suml2), scale)
        best = torch.where(upd, scale * sumlx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L)
    return scale, L


def _refine_codes(x, w, wx, L, sumlx, suml2, lo: Optional[float], hi: float, qp: bool) -> torch.Tensor:
    """The refinement passes shared by ``make_q3_quants`` (``qp=False``) and
    ``make_qp_quants`` (``qp=True``): up to five sweeps over the elements, each
    re-rounding one code against the others' ``sumlx = sum w*x*l`` / ``suml2 =
    sum w*l*l`` and keeping it when ``sumlx**2 / suml2`` grows. Updates ``L``
    (n, G) in place; returns the scale ``sumlx / suml2`` (0 where ``suml2 <= 0``).

    The two C loops differ in which ``sl2`` must be positive (the one without
    element ``i`` in make_qp_quants, the one with its new code in
    make_q3_quants) and in make_qp_quants' ``L`` being ``uint8_t``: the stored
    code wraps while the sums use the int ``new_l``."""
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            new_l = nearest_int(torch.div(x[i] * sl2, slx)).clamp_(lo, hi)
            slx2 = slx + wx[i] * new_l
            sl22 = sl2 + (w[i] * new_l) * new_l
            upd = (slx > 0) & ((sl2 if qp else sl22) > 0) & (new_l != li)
            upd &= (slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22
            L[i] = torch.where(upd, _wrap_u8(new_l) if qp else new_l, li)
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
            changed |= upd
        if not bool(changed.any()):
            break
    return torch.where(suml2 > 0, torch.div(sumlx, suml2), torch.zeros_like(sumlx))


def make_q3_quants(x: torch.Tensor, nmax: int):
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``. Returns (scale, L in 0..2*nmax-1)."""
    amax, mx = _first_absmax(x)
    zero = amax < _EPS
    lo, hi = float(-nmax), float(nmax - 1)
    L = nearest_int(_div(float(-nmax), mx) * x).clamp_(lo, hi)
    w = x * x
    wx = w * x
    scale = _refine_codes(x, w, wx, L, _seqsum(wx * L), _seqsum((w * L) * L), lo, hi, qp=False)
    L = L + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L)
    return scale, L


def make_qkx_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool, v3: bool
):
    """``make_qkx2_quants`` (``v3=False``) / ``make_qkx3_quants`` (``v3=True``,
    weights given): asymmetric scale + min with the ``rmin + rdelta*is``
    search. Returns (scale (G,), the_min (G,) = -min >= 0, L (n, G) in 0..nmax)."""
    n = x.shape[0]
    mn = x[0].clone()
    mx = x[0].clone()
    for i in range(1, n):
        mn = torch.where(x[i] < mn, x[i], mn)
        mx = torch.where(x[i] > mx, x[i], mx)
    sum_w = _seqsum_from_first(w)
    sum_x = _seqsum_from_first(w * x)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    degenerate = (mx <= mn) if v3 else (mx == mn)
    fmax = float(nmax)

    def err(scale, mn_, L):
        diff = (scale * L + mn_) - x
        diff = diff.abs() if use_mad else diff * diff
        return _seqsum(w * diff)

    iscale = _div(fmax, mx - mn)
    scale = _div(1.0, iscale)
    L = nearest_int(iscale * (x - mn)).clamp_(0.0, fmax)
    best = err(scale, mn, L)
    for step in range(nstep + 1):
        c = np.float32(rmin) + np.float32(rdelta) * np.float32(step)
        c = float(c + np.float32(nmax))
        iscale = _div(c, mx - mn)
        v = iscale * (x - mn)
        if v3:
            l = torch.where(v > 0, nearest_int(torch.where(v < fmax, v, torch.full_like(v, fmax))), torch.zeros_like(v))
        else:
            l = nearest_int(v).clamp_(0.0, fmax)
        wl = w * l
        sum_l = _seqsum(wl)
        sum_l2 = _seqsum(wl * l)
        sum_xl = _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = torch.div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = torch.div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, torch.div(sum_xl, sum_l2), this_scale)
        cur = err(this_scale, this_min, l)
        upd = (D > 0) & (cur < best) & ~degenerate
        L = torch.where(upd, l, L)
        best = torch.where(upd, cur, best)
        scale = torch.where(upd, this_scale, scale)
        mn = torch.where(upd, this_min, mn)
    zeros = torch.zeros_like(scale)
    scale = torch.where(degenerate, zeros, scale)
    L = torch.where(degenerate, torch.zeros_like(L), L)
    return scale, -mn, L


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor):
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: unsigned scale of the
    (non-negative) sub-block scales/mins. Returns (scale (G,), L (n, G) as the
    uint8 values C stores)."""
    mx = torch.zeros_like(x[0])
    for i in range(x.shape[0]):
        mx = torch.where(mx > x[i], mx, x[i])
    zero = mx < _EPS
    fmax = float(nmax)
    iscale = _div(fmax, mx)
    scale = _div(1.0, iscale)
    L = _wrap_u8(nearest_int(iscale * x))
    diff = x - scale * L
    best = _seqsum((qw * diff) * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        c = float(np.float32(0.1) * np.float32(step) + np.float32(nmax))
        iscale_is = _div(c, mx)
        scale_is = _div(1.0, iscale_is)
        l = torch.clamp_max(nearest_int(iscale_is * x), fmax)
        diff = x - scale_is * l
        mse = _seqsum((qw * diff) * diff)
        upd = mse < best
        best = torch.where(upd, mse, best)
        iscale = torch.where(upd, iscale_is, iscale)
    l = torch.clamp_max(nearest_int(iscale * x), fmax)
    L = _wrap_u8(l)
    wx = qw * x
    scale = _refine_codes(x, qw, wx, L, _seqsum(wx * l), _seqsum((qw * l) * l), None, fmax, qp=True)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L)
    return scale, L


# --- layout helpers -------------------------------------------------------------
def _columns(xb: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 256) -> (n, B*256/n): sub-block g = b*(256/n) + j as column g."""
    return xb.reshape(-1, n).t().contiguous()


def _per_block(v: torch.Tensor, s: int) -> torch.Tensor:
    """(B*s,) sub-block values -> (s, B)."""
    return v.view(-1, s).t()


def _per_group(v: torch.Tensor) -> torch.Tensor:
    """(s, B) -> (B*s,) in sub-block order (inverse of ``_per_block``)."""
    return v.t().reshape(-1)


def _rows(L: torch.Tensor, B: int) -> torch.Tensor:
    """(n, G) codes -> (B, 256) int32 in element order."""
    return L.t().reshape(B, QK_K).to(torch.int32)


def _block_sigma2(xb: torch.Tensor, times_two: bool) -> torch.Tensor:
    """``sumx2 = sum x*x`` over the 256 weights (sequential), ``/QK_K`` (``2*sumx2/QK_K``)."""
    xt = xb.t().contiguous()
    sumx2 = _seqsum(xt * xt)
    if times_two:
        sumx2 = 2.0 * sumx2
    return torch.div(sumx2, torch.full_like(sumx2, float(QK_K)))


def _importance(X: torch.Tensor, QW: torch.Tensor, sigma2: torch.Tensor, s: int) -> torch.Tensor:
    """``qw[l] * sqrtf(sigma2 + x*x)`` per element, ``sigma2`` per super-block."""
    sig = sigma2.repeat_interleave(s)
    return QW * sqrt_rn(sig + X * X)


def _requantize(X, L, d, m, lo: float, hi: float, offset: float):
    """The final pass with the stored (fp16, 6/4-bit) scales: ``d``/``m`` per
    sub-block (G,), ``m`` None for the symmetric types. A sub-block with
    ``d == 0`` keeps the codes of its scale search."""
    num = X if m is None else X + m
    l = nearest_int(torch.div(num, d.expand_as(X))).clamp_(lo, hi) + offset
    return torch.where(d != 0, l, L)


# --- the five types ---------------------------------------------------------------
def _q2_k(xb: torch.Tensor, qw: Optional[torch.Tensor]) -> torch.Tensor:
    B = xb.shape[0]
    X = _columns(xb, 16)
    if qw is None:
        W = X.abs()
        scales, mins, L = make_qkx_quants(X, W, 3, -0.5, 0.1, 15, True, False)
        S, M = _per_block(scales, 16), _per_block(mins, 16)
        max_scale, max_min = _running_max(S), _running_max(M)
        has_s, has_m = max_scale > 0, max_min > 0
        q4 = 15.0
        ls = nearest_int(_div(q4, max_scale) * S).to(torch.int32) & 0xFF
        ls = torch.where(has_s, ls, torch.zeros_like(ls))
        lm = nearest_int(_div(q4, max_min) * M).to(torch.int32)
        lm = torch.where(has_m, lm, torch.zeros_like(lm))
        byte = (ls | (lm << 4)) & 0xFF
        zero = torch.zeros_like(max_scale)
        d16 = torch.where(has_s, torch.div(max_scale, torch.full_like(max_scale, q4)), zero).to(torch.float16)
        m16 = torch.where(has_m, torch.div(max_min, torch.full_like(max_min, q4)), zero).to(torch.float16)
    else:
        sigma2 = _block_sigma2(xb, times_two=False)
        W = _importance(X, _columns(qw, 16), sigma2, 16)
        sw = _per_block(_seqsum(W), 16)
        scales, mins, L = make_qkx_quants(X, W, 3, -0.9, 0.05, 36, False, True)
        dm, Ls = make_qp_quants(_per_block(scales, 16), 15, sw)
        mm, Lm = make_qp_quants(_per_block(mins, 16), 15, sw)
        d16, m16 = dm.to(torch.float16), mm.to(torch.float16)
        ls, lm = Ls.to(torch.int32), Lm.to(torch.int32)
        byte = (ls | (lm << 4)) & 0xFF
    d = _per_group(d16.float() * (byte & 0xF).float())
    m = _per_group(m16.float() * (byte >> 4).float())
    L = _requantize(X, L, d, m, 0.0, 3.0, 0.0)
    return pack_k_blocks("Q2_K", d16, m16, (byte & 0xF).t(), (byte >> 4).t(), _rows(L, B))


def _q3_k(xb: torch.Tensor, qw: Optional[torch.Tensor]) -> torch.Tensor:
    B = xb.shape[0]
    X = _columns(xb, 16)
    if qw is None:
        scales, L = make_q3_quants(X, 4)
        S = _per_block(scales, 16)
        _, max_scale = _first_absmax(S)
        has = max_scale != 0
        iscale = _div(-32.0, max_scale)
        l = _wrap_i8(nearest_int(iscale * S)).clamp_(-32.0, 31.0) + 32.0
        l6 = torch.where(has, l, torch.zeros_like(l)).t()
        d16 = torch.where(has, _div(1.0, iscale), torch.zeros_like(iscale)).to(torch.float16)
        none = torch.zeros(B, 12, dtype=torch.int32, device=xb.device)
        sbytes = torch.where(has.unsqueeze(1), pack_q3_scales(l6), none)
    else:
        sigma2 = _block_sigma2(xb, times_two=True)
        W = _importance(X, _columns(qw, 16), sigma2, 16)
        sw = _per_block(_seqsum(W), 16)
        scales, L = make_qx_quants(X, 4, W)
        d_block, Ls = make_qx_quants(_per_block(scales, 16), 32, sw)
        d16 = d_block.to(torch.float16)
        sbytes = pack_q3_scales(Ls.t())
    sc = q3_scale_values(sbytes)
    d = (d16.float().unsqueeze(1) * sc.float()).reshape(-1)
    L = _requantize(X, L, d, None, -4.0, 3.0, 4.0)
    # The stored six-bit scales are what the bytes read back (+32), so the
    # block packs exactly the bytes built above.
    return pack_k_blocks("Q3_K", d16, None, sc + 32, None, _rows(L, B))


def _q45_k(xb: torch.Tensor, qw: Optional[torch.Tensor], five: bool) -> torch.Tensor:
    B = xb.shape[0]
    nmax = 31 if five else 15
    X = _columns(xb, 32)
    if qw is None:
        sum_x2 = _seqsum(X * X)
        av_x = sqrt_rn(torch.div(sum_x2, torch.full_like(sum_x2, 32.0)))
        W = av_x + X.abs()
        if five:
            scales, mins, L = make_qkx_quants(X, W, 31, -0.5, 0.1, 15, False, False)
        else:
            scales, mins, L = make_qkx_quants(X, W, 15, -1.0, 0.1, 20, False, False)
        S, M = _per_block(scales, 8), _per_block(mins, 8)
        max_scale, max_min = _running_max(S), _running_max(M)
        zero = torch.zeros_like(max_scale)
        inv_scale = torch.where(max_scale > 0, _div(63.0, max_scale), zero)
        inv_min = torch.where(max_min > 0, _div(63.0, max_min), zero)
        ls = _wrap_u8(nearest_int(inv_scale * S)).clamp_max_(63.0)
        lm = _wrap_u8(nearest_int(inv_min * M)).clamp_max_(63.0)
        d16 = torch.div(max_scale, torch.full_like(max_scale, 63.0)).to(torch.float16)
        m16 = torch.div(max_min, torch.full_like(max_min, 63.0)).to(torch.float16)
    else:
        sigma2 = _block_sigma2(xb, times_two=True)
        W = _importance(X, _columns(qw, 32), sigma2, 8)
        sw = _per_block(_seqsum(W), 8)
        scales, mins, L = make_qkx_quants(X, W, nmax, -0.9, 0.05, 36, False, True)
        d_block, ls = make_qp_quants(_per_block(scales, 8), 63, sw)
        m_block, lm = make_qp_quants(_per_block(mins, 8), 63, sw)
        if five:  # only Q5_K's _impl clamps the uint8 codes
            ls, lm = ls.clamp_max(63.0), lm.clamp_max(63.0)
        d16, m16 = d_block.to(torch.float16), m_block.to(torch.float16)
    ls, lm = ls.t(), lm.t()
    sc, mn = k4_scale_min(pack_k4_scales(ls, lm))
    d = (d16.float().unsqueeze(1) * sc.float()).reshape(-1)
    m = (m16.float().unsqueeze(1) * mn.float()).reshape(-1)
    L = _requantize(X, L, d, m, 0.0, float(nmax), 0.0)
    return pack_k_blocks("Q5_K" if five else "Q4_K", d16, m16, ls, lm, _rows(L, B))


def _q6_k(xb: torch.Tensor, qw: Optional[torch.Tensor]) -> torch.Tensor:
    B = xb.shape[0]
    X = _columns(xb, 16)
    scales, L = make_qx_quants(X, 32, None if qw is None else _columns(qw, 16))
    S = _per_block(scales, 16)
    amax, max_scale = _first_absmax(S)
    zero_block = amax < _EPS
    iscale = _div(-128.0, max_scale)
    d16 = _div(1.0, iscale).to(torch.float16)
    sc = _wrap_i8(nearest_int(iscale * S).clamp_max_(127.0))  # (16, B)
    d = _per_group(d16.float() * sc)
    L = _requantize(X, L, d, None, -32.0, 31.0, 32.0)
    out = pack_k_blocks("Q6_K", d16, None, sc.t(), None, _rows(L, B))
    return torch.where(zero_block.unsqueeze(1), torch.zeros_like(out), out)


def quantize_k_blocks(type_name: str, xb: torch.Tensor, qw: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 super-blocks ``(B, 256)`` (and their importance ``(B, 256)`` or
    None) -> llama.cpp's block bytes uint8 ``(B, type_size)``. Inputs are
    assumed finite (validated by the caller)."""
    xb = xb.to(torch.float32).contiguous()
    if qw is not None:
        qw = qw.to(torch.float32).contiguous()
    if type_name == "Q2_K":
        return _q2_k(xb, qw)
    if type_name == "Q3_K":
        return _q3_k(xb, qw)
    if type_name in ("Q4_K", "Q5_K"):
        return _q45_k(xb, qw, type_name == "Q5_K")
    if type_name == "Q6_K":
        return _q6_k(xb, qw)
    raise FormatError(f"no k-quant quantizer for GGUF type {type_name!r}; k-quant types are {list(K_TYPES)}")
