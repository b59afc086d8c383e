"""Pure-torch specification of the HQQ solver (every HQQ kernel is tested against it).

HQQ (half-quadratic quantization, Badri & Shaji 2023) needs no calibration data:
per group it looks for the zero point ``z`` that makes ``W_hat = (q - z) * s``
close to ``W`` in an l_p sense (p < 1, robust to outliers), with ``q =
clamp(round(W / s + z))``. The half-quadratic splitting introduces an auxiliary
error ``W_e`` and alternates two closed forms::

    W_e = shrink_lp(W - W_hat, beta)            # generalised soft threshold
    z   = mean(q - (W - W_e) / s)               # per group

What follows mirrors the ``hqq`` package (0.2.8, ``optimize_weights_proximal``)
with these deliberate differences, all documented in ``pyquant/algorithms/hqq.py``:

* Groups are independent: early stopping and the choice of the best iterate are
  per group, not on the error of the whole tensor. That is what lets a fused
  kernel run all iterations of a tile of groups in one launch.
* Every iterate ``z_k`` is *scored with the values the format stores*: the
  scale and zero rounded to ``scale_dtype`` and the codes those give. The
  best-scoring one is kept (so the result is never worse than the
  initialisation). The score is the squared error ``sum (W - W_hat)**2``, the
  quantity the weight error is judged by.
* The iteration itself runs on the unrounded fp32 ``z`` (rounding ``z`` to fp16
  at every step stalls it: at 8 bits the steps are smaller than an fp16 ulp).
* Early stopping halts a group when the iteration has reached a fixed point
  (``z`` unchanged bit for bit, and no shrinkage can switch on later), i.e.
  when every further iterate would equal this one. Stopping at the first
  non-decrease of a single group's error (hqq stops on the whole tensor's)
  loses up to 0.6 % of weight error against hqq on unit-variance weights.
* Round-to-nearest (pyquant's RTN: range including 0, integer zero) is a second
  candidate per group; the better of the two is kept, so HQQ is never worse
  than RTN.
* Groups may be ragged (the last one shorter); hqq needs divisibility.
* ``kappa`` (beta's growth per step) is applied, as hqq's ``..._v2`` does; its
  default optimizer (``..._legacy``) never applies it, i.e. uses ``kappa=1``.

The fp32 arithmetic below is the contract the kernels follow: no fused
multiply-add in the per-element expressions, round half to even.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..primitives import range_scale_zero, round_to, tiny_scale  # noqa: F401  (tiny_scale: the solvers' contract)

# Elements whose |W - W_hat| is below (1 - 2**-8) times the shrink threshold
# beta**(-1/(2-p)) are not shrunk (mathematically their shrinkage is 0; the
# margin keeps kernels with an approximate pow() in agreement with this spec).
THRESHOLD_MARGIN = 1.0 - 2.0 ** -8


@dataclasses.dataclass
class HQQSolution:
    """Solver output for a weight ``(N, K)`` cut into ``G`` groups per row.

    ``scales``/``zeros`` hold values already rounded to the format's
    ``scale_dtype`` (stored as fp32); ``err`` is each group's squared error
    ``sum (W - W_hat)**2`` with those values; ``iters`` the number of proximal
    steps each group ran (0 where hqq's init is degenerate, e.g. a constant
    group, and only RTN's candidate was scored).
    """

    codes: torch.Tensor  # uint8 (N, K)
    scales: torch.Tensor  # fp32 (N, G)
    zeros: torch.Tensor  # fp32 (N, G)
    err: torch.Tensor  # fp32 (N, G)
    iters: torch.Tensor  # int32 (N, G)

    @classmethod
    def empty(cls, n: int, k: int, group: int, device: torch.device | str = "cpu") -> HQQSolution:
        """Uninitialized outputs for a solver kernel that writes every element."""
        ng = math.ceil(k / group)
        scales = torch.empty((n, ng), dtype=torch.float32, device=device)
        return cls(
            torch.empty((n, k), dtype=torch.uint8, device=device), scales, torch.empty_like(scales),
            torch.empty_like(scales), torch.empty((n, ng), dtype=torch.int32, device=device),
        )


def solver_schedule(iters: int, lp_norm: float, beta: float, kappa: float) -> torch.Tensor:
    """fp32 ``(2, iters)``: row 0 is 1/beta at each proximal step, row 1 the
    shrink threshold at that step. beta grows by ``kappa`` per step (fp64
    products, as hqq's Python loop); every backend reads this same table."""
    inv, thr, b = [], [], float(beta)
    for _ in range(iters):
        inv.append(1.0 / b)
        thr.append(b ** (-1.0 / (2.0 - lp_norm)) * THRESHOLD_MARGIN)
        b *= kappa
    return torch.tensor([inv, thr], dtype=torch.float32).reshape(2, iters)


def shrink_lp(x: torch.Tensor, inv_beta: torch.Tensor, lp_norm: float, threshold: torch.Tensor) -> torch.Tensor:
    """sign(x) * max(|x| - |x|**(p-1) / beta, 0) (hqq's shrink_lp_op); 0 at or below ``threshold``."""
    a = x.abs()
    val = (a - a.clamp_min(1e-30).pow(lp_norm - 1.0) * inv_beta).clamp_min(0.0)
    val = torch.where(a > threshold, val, torch.zeros_like(val))
    return torch.where(x < 0, -val, val)


def _div(a, b: torch.Tensor) -> torch.Tensor:
    """IEEE a / b elementwise (torch turns ``scalar / tensor`` into a
    reciprocal and a multiply, two roundings; the kernels divide once)."""
    a = torch.full_like(b, a) if not isinstance(a, torch.Tensor) else a
    b = b if isinstance(b, torch.Tensor) else torch.full_like(a, b)
    return torch.div(a, b)


def group_view(w: torch.Tensor, group_size: int):
    """``w`` (N, K) zero-padded to whole groups, as ``(N, G, g)``, with the
    mask of real columns ``(1, G, g)`` and each group's min and max ``(N, G)``."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    ng = math.ceil(k / g)
    wp = torch.zeros((n, ng * g), dtype=torch.float32, device=w.device)
    wp[:, :k] = w
    W = wp.view(n, ng, g)
    valid = torch.zeros((ng * g,), dtype=torch.bool, device=w.device)
    valid[:k] = True
    valid = valid.view(1, ng, g)
    inf = torch.tensor(float("inf"), dtype=torch.float32, device=w.device)
    return W, valid, torch.where(valid, W, inf).amin(-1), torch.where(valid, W, -inf).amax(-1)


def hqq_solve_reference(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype,
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    early_stop: bool = True,
) -> HQQSolution:
    """Quantize ``w`` (fp32, (N, K), finite) group-wise along K. See module docstring."""
    n, k = w.shape
    f32 = torch.float32
    dev = w.device
    maxq = float((1 << bits) - 1)
    W, valid, lo, hi = group_view(w, group_size)
    ng, g = W.shape[1], W.shape[2]
    cnt = valid.sum(-1, dtype=torch.int32).to(f32)  # (1, ng)

    def sq_err(s, z, sinv):
        q = torch.clamp(torch.round(W * sinv[..., None] + z[..., None]), 0.0, maxq)
        r = (q - z[..., None]) * s[..., None]
        d = W - r
        return torch.where(valid, d * d, torch.zeros_like(d)).sum(-1)

    # --- candidate 1: pyquant's RTN (range including 0, integral zero) -------
    s_r, z_r = range_scale_zero(lo, hi, (1 << bits) - 1, scale_dtype)
    sinv_r = _div(1.0, s_r)
    e_r = sq_err(s_r, z_r, sinv_r)

    # --- candidate 2: HQQ from hqq's min/max init -----------------------------
    sinv_h = _div(maxq, hi - lo)  # hqq's inverse scale
    s32 = _div(1.0, sinv_h)  # scale the iteration runs with
    s_st = round_to(s32, scale_dtype)  # scale the format stores
    sinv_d = _div(1.0, s32)
    sinv_e = _div(1.0, s_st)
    zd = -lo * sinv_d
    ok = (hi > lo) & torch.isfinite(s32) & (s_st > 0) & torch.isfinite(s_st) & torch.isfinite(sinv_e)
    ok &= torch.isfinite(sinv_d) & torch.isfinite(round_to(zd, scale_dtype))
    one = torch.ones_like(s32)
    s32, s_st = torch.where(ok, s32, one), torch.where(ok, s_st, one)
    sinv_d, sinv_e = torch.where(ok, sinv_d, one), torch.where(ok, sinv_e, one)
    zd = torch.where(ok, zd, torch.zeros_like(zd))

    best = torch.full_like(lo, float("inf"))
    best_z = torch.zeros_like(lo)
    active = ok.clone()
    steps = torch.zeros(lo.shape, dtype=torch.int32, device=dev)
    sched = solver_schedule(iters, lp_norm, beta, kappa).to(dev)
    thr_last = sched[1, -1] if iters else None
    for it in range(iters + 1):
        zs = round_to(zd, scale_dtype)
        e = sq_err(s_st, zs, sinv_e)
        better = active & (e < best)
        best = torch.where(better, e, best)
        best_z = torch.where(better, zs, best_z)
        if it == iters or not bool(active.any()):
            break
        q = torch.clamp(torch.round(W * sinv_d[..., None] + zd[..., None]), 0.0, maxq)
        d = W - (q - zd[..., None]) * s32[..., None]
        we = shrink_lp(d, sched[0, it], lp_norm, sched[1, it])
        t = q - (W - we) * sinv_d[..., None]
        znew = _div(torch.where(valid, t, torch.zeros_like(t)).sum(-1), cnt.expand_as(zd))
        steps += active.to(torch.int32)
        if early_stop:
            maxd = torch.where(valid, d.abs(), torch.zeros_like(d)).amax(-1)
            fixed = (znew == zd) & ((kappa == 1.0) | (maxd <= thr_last))
        else:
            fixed = torch.zeros_like(active)
        zd = torch.where(active, znew, zd)
        active &= ~fixed

    use_h = best <= e_r
    s = torch.where(use_h, s_st, s_r)
    z = torch.where(use_h, best_z, z_r)
    sinv = torch.where(use_h, sinv_e, sinv_r)
    err = torch.where(use_h, best, e_r)
    q = torch.clamp(torch.round(W * sinv[..., None] + z[..., None]), 0.0, maxq)
    codes = q.to(torch.uint8).view(n, ng * g)[:, :k].contiguous()
    return HQQSolution(codes, s, z, err, steps)
