"""Least-squares group parameters for fixed codes (a GPTQ post-pass).

GPTQ picks each group's (scale, zero) before its codes (from the weight's
range, optionally clipped) and then chooses the codes against those
parameters. Once every code is fixed, the dequantized row is linear in the
parameters, ``dq_j = s_a * q_j - s_a * z_a`` for column ``j`` of group ``a``,
so the parameters that minimise the layer's output error on the calibration
inputs,

    (dq - w) Hd (dq - w)^T,   Hd = H + damp * mean(diag H) * I,

are one small linear solve per row: ``2 * n_groups`` unknowns
(``"scale_zero"``: ``alpha = s``, ``beta = -s * z``, float zero points) or
``n_groups`` (``"scale"``: the zero points stay the integers GPTQ chose, so
GPTQ/AWQ checkpoints can still store them; symmetric formats have only this
one). The damping is GPTQ's own, so the refit pulls towards the weights as
much as GPTQ's updates did.

A row keeps its refitted parameters only if, rounded to the stored scale
dtype, they lower that row's damped error and every scale stays positive:
the pass never makes a row worse on the objective it is judged by.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..errors import ShapeError, ValueRangeError
from ..formats import Int
from ..ops.primitives import pad_groups

REFIT_MODES = (None, "scale", "scale_zero")
_CHUNK_FLOATS = 1 << 25  # rows per chunk keep the (groups x rows x k) product near 128 MiB
# A row takes new parameters only if they lower its error by more than this
# fraction of its output energy w Hd w^T: well above the fp32 accumulation
# error of the normal equations the improvement is computed from.
_MIN_GAIN = 1e-5


def refit_group_params(
    W: torch.Tensor,
    H: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    fmt: Int,
    *,
    damp: float,
    mode: str = "scale_zero",
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Refit ``(scales, zeros)`` (fp32 ``(N, G)``) of ``codes`` (``(N, K)``,
    columns in the same order as ``W`` ``(N, K)`` and ``H`` ``(K, K)``).

    Returns ``(scales, zeros, rows_changed)``; the parameters are rounded to
    ``fmt.scale_dtype`` and returned as fp32.
    """
    if mode not in ("scale", "scale_zero"):
        raise ValueRangeError(f"refit mode must be 'scale' or 'scale_zero', got {mode!r}")
    n, k = W.shape
    g = fmt.group_size_for(k)
    ng = fmt.num_groups(k)
    if H.shape != (k, k) or codes.shape != (n, k) or scales.shape != (n, ng) or zeros.shape != (n, ng):
        raise ShapeError(
            f"refit: W {tuple(W.shape)}, H {tuple(H.shape)}, codes {tuple(codes.shape)}, scales "
            f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)} do not describe one ({n}, {k}) layer in groups of {g}"
        )
    free_zero = mode == "scale_zero" and not fmt.symmetric
    kp = ng * g
    dev = W.device
    mean_diag = float(H.diagonal().mean())
    # Pad columns (ragged last group) get zero weight, zero code and zero Gram
    # rows and columns: they add nothing to any sum below.
    Hd = torch.zeros((kp, kp), dtype=torch.float32, device=dev)
    Hd[:k, :k] = H
    Hd.diagonal()[:k] += damp * (mean_diag if mean_diag > 0 else 1.0)
    Hblk = Hd.view(ng, g, kp)  # group a's rows of Hd
    # The constant basis vector (zero point) is the same in every row: its
    # Gram entries are block sums of Hd, computed once.
    Hsum = Hd.view(kp, ng, g).sum(-1).view(ng, g, ng)  # [a, j, b] = sum_{l in b} Hd[a j, b l]
    H11 = Hsum.sum(1)  # [a, b] = sum over the block (a, b)
    col_group = torch.arange(k, device=dev) // g
    out_s, out_z = scales.clone(), zeros.clone()
    changed = 0
    rows = max(1, _CHUNK_FLOATS // (ng * kp))
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        r = r1 - r0
        s0, z0 = scales[r0:r1], zeros[r0:r1]
        w = pad_groups(W[r0:r1].float(), g).view(r, kp)
        # dq = alpha * u (+ beta): u = q with a free zero (beta = -s z), u = q - z with it fixed.
        q = codes[r0:r1].float()
        u3 = pad_groups(q if free_zero else q - z0[:, col_group], g)
        wH = (w @ Hd).view(r, ng, g)
        # T[b, i, (a, j)] = u_i[block b] @ Hd[block b rows, a j]: the one O(rows * k^2) step, a batched GEMM.
        T = torch.bmm(u3.transpose(0, 1), Hblk).view(ng, r, ng, g)
        Muu = (T * u3.unsqueeze(0)).sum(-1).permute(1, 2, 0)  # [i, a, b]
        vu = (u3 * wH).sum(-1)
        if free_zero:
            Mu1 = torch.bmm(u3.transpose(0, 1), Hsum).transpose(0, 1)  # [i, a, b] = u_a^T Hd_ab 1
            M = torch.cat([torch.cat([Muu, Mu1], 2), torch.cat([Mu1.transpose(1, 2), H11.expand(r, ng, ng)], 2)], 1)
            v = torch.cat([vu, wH.sum(-1)], 1)
            theta0 = torch.cat([s0, -s0 * z0], 1)
        else:
            M, v, theta0 = Muu, vu, s0
        M, v, theta0 = M.double(), v.double(), theta0.double()
        # A group whose codes are all equal makes (q, 1) collinear: a ridge
        # towards the current parameters keeps every system well posed.
        lam = 1e-7 * M.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-30)
        Mr = M.clone()
        Mr.diagonal(dim1=1, dim2=2).add_(lam[:, None])
        theta = torch.linalg.solve(Mr, v + lam[:, None] * theta0)
        s1 = theta[:, :ng].to(fmt.scale_dtype).double()
        z1 = (-theta[:, ng:] / theta[:, :ng]).to(fmt.scale_dtype).double() if free_zero else z0.double()
        theta1 = torch.cat([s1, -s1 * z1], 1) if free_zero else s1
        # Change of the row's error, from the normal equations (the quadratic is exact):
        # e(t1) - e(t0) = (t1 - t0)^T (M (t1 + t0) - 2 v).
        delta = theta1 - theta0
        gain = -(delta * (torch.bmm(M, (theta1 + theta0).unsqueeze(2)).squeeze(2) - 2 * v)).sum(1)
        energy = (w.double() * wH.view(r, kp).double()).sum(1)
        ok = (gain > _MIN_GAIN * energy) & (s1 > 0).all(1) & torch.isfinite(z1).all(1)  # NaN compares False
        out_s[r0:r1] = torch.where(ok[:, None], s1.float(), s0)
        out_z[r0:r1] = torch.where(ok[:, None], z1.float(), z0)
        changed += int(ok.sum())
    return out_s, out_z, changed
