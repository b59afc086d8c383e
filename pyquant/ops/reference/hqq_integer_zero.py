"""HQQ around an integer zero point: pyquant's default HQQ.

``zero_point="anchored"`` (the default) and ``"integer"``; ``"float"`` is the
``hqq`` package's formulation (``hqq_reference.py``). Same objective, same
proximal loop and parameters (l_p with p=0.7, beta 10 growing by kappa 1.01,
up to 20 iterations, best iterate kept), in two phases per group:

1. Scale: the zero point ``z`` is RTN's integer (range widened to include 0),
   and the solver updates the scale in closed form,
   ``s = <q - z, W - W_e> / <q - z, q - z>``, never below the smallest scale
   that clips nothing, ``max(hi / (maxq + 1/2 - z), -lo / (z + 1/2))``: every
   weight, the group's extremes included, is reproduced within half a step.
2. Zero (``"anchored"`` only): HQQ's zero step at that scale, the zero kept
   within ``ZERO_SLACK`` = 0.1 of the integer, so a weight of 0 comes back
   within a tenth of a step. ``"integer"`` skips this: 0 is exact.

Why: on SmolLM2-135M the free float zero has lower weight error than RTN on
every layer, yet far worse perplexity (3-bit g64: 66.5 vs RTN's 28.4 in
domain, 275.8 vs 64.6 out of domain). The damage sits in v_proj and
down_proj: their inputs carry a few channels ~30x larger than the median
(attention-sink and massive activations), and the weights in those columns
are small, so what matters there is how well near-zero weights are kept. A
fractional zero shifts every near-zero weight of a group by the same offset
of up to half a step, which an l_p objective with p < 1 barely sees.
Rounding the float zero alone brings perplexity back to RTN's. An integer
zero with a solved scale ("integer") beats RTN everywhere except 4-bit g64
out of domain (+2%); letting the zero move by a tenth of a step recovers
most of the float zero's gain at 4 bits without its damage at 3 bits
(numbers in ``benchmarks/results/defaults-evidence.md`` and ``benchmarks/results/quality-smollm2.md``).

The initial iterate is RTN itself, so each group's squared error is never
above RTN's. This file is the spec and runs on any device;
``csrc/cpu/hqq_integer_zero.cpp`` is the CPU kernel (same expressions,
another summation order). No GPU kernel: on a GPU this torch code runs.
"""
from __future__ import annotations

import torch

from .hqq import HQQSolution, _div, group_view, shrink_lp, solver_schedule
from ..primitives import range_scale_zero, round_to

# How far (in quantization steps) the default mode lets the zero point leave
# its integer; see the module docstring.
ZERO_SLACK = 0.1


def _no_clip_scale(lo, hi, z, maxq):
    """Smallest scale at which ``round(W / s + z)`` stays in ``[0, maxq]``
    up to the half-step rounding: nothing in ``[lo, hi]`` is clipped."""
    up = hi.clamp(min=0.0) / (maxq + 0.5 - z)
    down = (-lo).clamp(min=0.0) / (z + 0.5)
    return torch.maximum(up, down)


def _store(s, floor, scale_dtype):
    """``s`` as ``scale_dtype`` stores it, bumped one ulp up where rounding
    took it below the no-clip ``floor``."""
    st = s.to(scale_dtype)
    low = st.to(torch.float32) < floor
    st = torch.where(low, torch.nextafter(st, torch.full_like(st, float("inf"))), st)
    return st.to(torch.float32)


def hqq_solve_integer_zero(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype,
    *,
    zero_slack: float = ZERO_SLACK,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    early_stop: bool = True,
) -> HQQSolution:
    """Quantize ``w`` (fp32, (N, K), finite) group-wise along K; see the module
    docstring. ``zero_slack``: how far (in steps) the zero may leave RTN's
    integer in the second phase (0: none, the zero stays an integer)."""
    n, k = w.shape
    maxq = float((1 << bits) - 1)
    W, valid, lo, hi = group_view(w, group_size)
    ng, g = W.shape[1], W.shape[2]
    cnt = valid.sum(-1, dtype=torch.int32).to(torch.float32)
    s_rtn, z_int = range_scale_zero(lo, hi, (1 << bits) - 1, scale_dtype)
    floor = _no_clip_scale(lo, hi, z_int, maxq)
    zero = torch.zeros((), dtype=torch.float32, device=w.device)

    def codes(s, z):  # times the reciprocal, as RTN and the float solver quantize
        return torch.clamp(torch.round(W * _div(1.0, s)[..., None] + z[..., None]), 0.0, maxq)

    def sq_err(s, z):
        d = W - (codes(s, z) - z[..., None]) * s[..., None]
        return torch.where(valid, d * d, zero).sum(-1)

    sched = solver_schedule(iters, lp_norm, beta, kappa).to(w.device)
    thr_last = sched[1, -1] if iters else None

    def is_fixed(new, old, d):  # reproduces itself, and no shrinkage can switch on later
        if not early_stop:
            return torch.zeros_like(new, dtype=torch.bool)
        return (new == old) & ((kappa == 1.0) | (d.abs().amax(-1) <= thr_last))

    def keep_better(active, e, best, cand, best_cand):  # each group keeps its best-scoring iterate
        better = active & (e < best)
        return torch.where(better, e, best), torch.where(better, cand, best_cand)

    # Phase 1: the scale, zero fixed at RTN's integer.
    z = z_int
    best_s, best = s_rtn, sq_err(s_rtn, z)
    s = s_rtn.clone()
    # An all-zero group has nothing to fit (its RTN scale is the tiny fallback).
    live = hi > lo
    active = live.clone()
    steps = torch.zeros(lo.shape, dtype=torch.int32, device=w.device)
    for it in range(iters):
        if not bool(active.any()):
            break
        qz = torch.where(valid, codes(s, z) - z[..., None], zero)
        d = torch.where(valid, W - qz * s[..., None], zero)
        target = W - shrink_lp(d, sched[0, it], lp_norm, sched[1, it])
        num = (qz * target).sum(-1)
        den = (qz * qz).sum(-1)
        s_new = torch.where(den > 0, num / den.clamp_min(1e-30), s)
        s_new = torch.maximum(s_new, floor)
        steps += active.to(torch.int32)
        s_st = _store(s_new, floor, scale_dtype)
        e = sq_err(s_st, z)
        best, best_s = keep_better(active, e, best, s_st, best_s)
        active &= ~is_fixed(s_new, s, d)
        s = torch.where(active, s_new, s)

    # Phase 2: HQQ's zero step at that (stored) scale, the zero kept within
    # zero_slack of the integer, so a weight of 0 stays within zero_slack steps.
    best_z = z_int
    if zero_slack > 0:
        s, sinv = best_s, _div(1.0, best_s)
        z_lo, z_hi = z_int - zero_slack, z_int + zero_slack
        zd = z_int.clone()
        active = live.clone()
        for it in range(iters):
            if not bool(active.any()):
                break
            q = codes(s, zd)
            d = torch.where(valid, W - (q - zd[..., None]) * s[..., None], zero)
            t = q - (W - shrink_lp(d, sched[0, it], lp_norm, sched[1, it])) * sinv[..., None]
            z_new = _div(torch.where(valid, t, zero).sum(-1), cnt.expand_as(zd))
            z_new = torch.minimum(torch.maximum(z_new, z_lo), z_hi)
            steps += active.to(torch.int32)
            zs = round_to(z_new, scale_dtype)
            e = sq_err(s, zs)
            best, best_z = keep_better(active, e, best, zs, best_z)
            active &= ~is_fixed(z_new, zd, d)
            zd = torch.where(active, z_new, zd)

    q = codes(best_s, best_z)
    out_codes = q.to(torch.uint8).view(n, ng * g)[:, :k].contiguous()
    return HQQSolution(out_codes, best_s, best_z, best, steps)
