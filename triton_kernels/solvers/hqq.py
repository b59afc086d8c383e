"""Fused HQQ solver in Triton (experimental until a GPU run verifies it).

One program owns a tile of ``BLOCK_G`` groups, loads them once into registers
(a group is at most ``BLOCK_L`` = next power of two of the group length) and
runs every proximal step there: the weight is read from global memory once and
codes/scales/zeros are written once, so the launch is compute-bound instead of
paying hqq's ~10 full-tensor passes per step. Groups in a tile stop
independently (masked); the tile leaves its loop when none is active.

The arithmetic follows ``pyquant/algorithms/hqq_reference.py`` (round half to
even, no FMA contraction: the launch passes ``enable_fp_fusion=False`` on a
GPU); pow() uses the hardware exp2/log2, so zero points may differ from the
spec in the last bits. Runs on CPU tensors under ``TRITON_INTERPRET=1``.

The caller (``pyquant.algorithms.hqq``) owns the algorithm's parameters: it
passes the per-step schedule (``hqq_reference.solver_schedule``: 1/beta and the
shrink threshold of every step, so beta and kappa need not be known here) and
the all-zero group's scale (``hqq_reference.tiny_scale``), and wraps the five
returned tensors into its ``HQQSolution``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pyquant.errors import FormatError, ShapeError

from .ieee import div, exact_options, rint


@triton.jit
def _to_stored(x, DTYPE: tl.constexpr):
    if DTYPE == 1:
        return x.to(tl.float16).to(tl.float32)
    elif DTYPE == 2:
        # bf16 by hand, ties to even: the interpreter's cast truncates
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    else:
        return x


@triton.jit
def _sq_err(w, valid, s, z, sinv, maxq):
    q = tl.minimum(tl.maximum(rint(w * sinv[:, None] + z[:, None]), 0.0), maxq)
    d = w - (q - z[:, None]) * s[:, None]
    return tl.sum(tl.where(valid, d * d, 0.0), axis=1)


@triton.jit
def _hqq_solve_kernel(
    W, CODES, SCALES, ZEROS, ERR, STEPS, SCHED,
    total, ng, K, G, maxq, thr_last, p1, tiny,
    ITERS: tl.constexpr, DTYPE: tl.constexpr, KAPPA_ONE: tl.constexpr, EARLY: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    gid = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = gid < total
    row = gid // ng
    c0 = (gid % ng) * G
    L = tl.minimum(G, K - c0)
    cols = tl.arange(0, BLOCK_L)
    valid = gmask[:, None] & (cols[None, :] < L[:, None])
    offs = row[:, None].to(tl.int64) * K + c0[:, None] + cols[None, :]
    w = tl.load(W + offs, mask=valid, other=0.0)
    lo = tl.min(tl.where(valid, w, float("inf")), axis=1)
    hi = tl.max(tl.where(valid, w, float("-inf")), axis=1)
    lo = tl.where(gmask, lo, 0.0)
    hi = tl.where(gmask, hi, 0.0)

    # candidate 1: pyquant's RTN
    lo_r = tl.minimum(lo, 0.0)
    hi_r = tl.maximum(hi, 0.0)
    s_r = _to_stored(div(hi_r - lo_r, maxq + tl.zeros_like(hi_r)), DTYPE)
    s_r = tl.where(s_r > 0.0, s_r, tiny)
    z_r = tl.minimum(tl.maximum(rint(div(-lo_r, s_r)), 0.0), maxq)
    sinv_r = div(tl.full(s_r.shape, 1.0, tl.float32), s_r)
    e_r = _sq_err(w, valid, s_r, z_r, sinv_r, maxq)

    # candidate 2: HQQ from hqq's min/max init
    sinv_h = div(maxq + tl.zeros_like(hi), hi - lo)
    one = tl.full(hi.shape, 1.0, tl.float32)
    s32 = div(one, sinv_h)
    s_st = _to_stored(s32, DTYPE)
    sinv_d = div(one, s32)
    sinv_e = div(one, s_st)
    zd = -lo * sinv_d
    big = 3.0e38
    ok = gmask & (hi > lo) & (tl.abs(s32) < big) & (s_st > 0.0) & (s_st < big) & (sinv_e < big)
    ok = ok & (sinv_d < big) & (tl.abs(_to_stored(zd, DTYPE)) < big)
    s32 = tl.where(ok, s32, 1.0)
    s_st = tl.where(ok, s_st, 1.0)
    sinv_d = tl.where(ok, sinv_d, 1.0)
    sinv_e = tl.where(ok, sinv_e, 1.0)
    zd = tl.where(ok, zd, 0.0)

    best = tl.full((BLOCK_G,), float("inf"), tl.float32)
    best_z = tl.zeros((BLOCK_G,), tl.float32)
    steps = tl.zeros((BLOCK_G,), tl.int32)
    active = ok
    n_active = tl.sum(active.to(tl.int32), axis=0)
    it = 0
    while (it < ITERS) & (n_active > 0):
        zs = _to_stored(zd, DTYPE)
        e = _sq_err(w, valid, s_st, zs, sinv_e, maxq)
        better = active & (e < best)
        best = tl.where(better, e, best)
        best_z = tl.where(better, zs, best_z)

        inv_beta = tl.load(SCHED + it)
        thr = tl.load(SCHED + ITERS + it)
        q = tl.minimum(tl.maximum(rint(w * sinv_d[:, None] + zd[:, None]), 0.0), maxq)
        d = w - (q - zd[:, None]) * s32[:, None]
        a = tl.abs(d)
        pw = tl.exp2(p1 * tl.log2(tl.maximum(a, 1e-30)))
        v = tl.maximum(a - pw * inv_beta, 0.0)
        v = tl.where(a > thr, v, 0.0)
        we = tl.where(d < 0.0, -v, v)
        t = q - (w - we) * sinv_d[:, None]
        znew = div(tl.sum(tl.where(valid, t, 0.0), axis=1), L.to(tl.float32))
        steps += active.to(tl.int32)
        if EARLY:
            maxd = tl.max(tl.where(valid, a, 0.0), axis=1)
            if KAPPA_ONE:
                fixed = znew == zd
            else:
                fixed = (znew == zd) & (maxd <= thr_last)
        else:
            fixed = znew != znew  # all False
        zd = tl.where(active, znew, zd)
        active = active & (fixed == 0)
        n_active = tl.sum(active.to(tl.int32), axis=0)
        it += 1

    # the last iterate (after ITERS steps) is scored too, unless its group stopped
    zs = _to_stored(zd, DTYPE)
    e = _sq_err(w, valid, s_st, zs, sinv_e, maxq)
    better = active & (e < best)
    best = tl.where(better, e, best)
    best_z = tl.where(better, zs, best_z)

    use_h = best <= e_r
    s = tl.where(use_h, s_st, s_r)
    z = tl.where(use_h, best_z, z_r)
    sinv = tl.where(use_h, sinv_e, sinv_r)
    q = tl.minimum(tl.maximum(rint(w * sinv[:, None] + z[:, None]), 0.0), maxq)
    tl.store(CODES + offs, q.to(tl.uint8), mask=valid)
    tl.store(SCALES + gid, s, mask=gmask)
    tl.store(ZEROS + gid, z, mask=gmask)
    tl.store(ERR + gid, tl.where(use_h, best, e_r), mask=gmask)
    tl.store(STEPS + gid, steps, mask=gmask)


_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def hqq_solve(w, bits, group, scale_dtype, lp_norm, kappa_one, early_stop, schedule, tiny):
    """Fused HQQ solve of ``w``, fp32 contiguous (N, K), finite (validated by the caller).

    ``bits``: code width (codes 0 .. 2**bits - 1); ``group``: weights per group
    along K (the last group of a row may be shorter); ``scale_dtype``: the stored
    scale/zero dtype (fp32, fp16 or bf16) every candidate is rounded to;
    ``lp_norm``: p of the shrinkage; ``kappa_one``: beta stays constant (kappa ==
    1), so a group whose zero stopped moving has converged; ``early_stop``: stop
    a group at that fixed point; ``schedule``: fp32 (2, iters), row 0 1/beta and
    row 1 the shrink threshold of each of the ``iters`` proximal steps (on the
    CPU: its last threshold is read on the host); ``tiny``: the scale of an
    all-zero group.

    Returns ``(codes, scales, zeros, err, iters)``: uint8 (N, K); fp32 (N, G)
    scales and zeros (already rounded to ``scale_dtype``) and squared error per
    group; int32 (N, G) proximal steps each group ran.
    """
    if scale_dtype not in _DTYPE_CODE:
        raise FormatError(f"hqq_solve: scale_dtype must be fp32, fp16 or bf16, got {scale_dtype}")
    if schedule.dim() != 2 or schedule.shape[0] != 2 or schedule.dtype != torch.float32:
        raise ShapeError(f"hqq_solve: schedule must be fp32 (2, iters), got {schedule.dtype} {tuple(schedule.shape)}")
    n, k = w.shape
    iters = schedule.shape[1]
    ng = math.ceil(k / group)
    total = n * ng
    dev = w.device
    codes = torch.empty((n, k), dtype=torch.uint8, device=dev)
    scales = torch.empty((n, ng), dtype=torch.float32, device=dev)
    zeros = torch.empty_like(scales)
    err = torch.empty_like(scales)
    steps = torch.empty((n, ng), dtype=torch.int32, device=dev)
    thr_last = float(schedule[1, -1]) if iters else 0.0
    if iters == 0:  # keep a valid pointer for the (never executed) schedule loads
        schedule = torch.zeros((2, 1), dtype=torch.float32)
    schedule = schedule.to(dev).contiguous()
    block_l = triton.next_power_of_2(group)
    block_g = max(1, min(64, 4096 // block_l))  # ~4K fp32 per array per program
    grid = (triton.cdiv(total, block_g),)
    _hqq_solve_kernel[grid](
        w, codes, scales, zeros, err, steps, schedule,
        total, ng, k, group, float((1 << bits) - 1), thr_last, float(lp_norm) - 1.0, float(tiny),
        ITERS=iters, DTYPE=_DTYPE_CODE[scale_dtype], KAPPA_ONE=bool(kappa_one), EARLY=bool(early_stop),
        BLOCK_G=block_g, BLOCK_L=block_l, num_warps=4 if block_g * block_l <= 2048 else 8,
        **exact_options(_hqq_solve_kernel, dev),
    )
    return codes, scales, zeros, err, steps
