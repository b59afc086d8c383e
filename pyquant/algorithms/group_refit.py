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

REFIT_MODES = (None, "scale", "scale_zero")
_CHUNK_FLOATS = 1 << 25  # rows per chunk keep the (groups x rows x k) product near 128 MiB


def _row_errors(dq: torch.Tensor, w: torch.Tensor, Hd: torch.Tensor) -> torch.Tensor:
    d = dq - w
    return ((d @ Hd) * d).sum(1)


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
    nb = 2 if free_zero else 1
    kp = ng * g
    dev = W.device
    mean_diag = float(H.diagonal().mean())
    Hd = torch.zeros((kp, kp), dtype=torch.float32, device=dev)
    Hd[:k, :k] = H
    Hd.diagonal()[:k] += damp * (mean_diag if mean_diag > 0 else 1.0)
    # Pad columns have zero weight, zero basis and zero Gram rows: they add nothing.
    Hblk = Hd.view(kp, ng, g).permute(1, 2, 0).contiguous()  # (G, g, kp): rows of Hd per group
    idx = torch.arange(k, device=dev) // g
    out_s, out_z = scales.clone(), zeros.clone()
    changed = 0
    rows = max(1, _CHUNK_FLOATS // (ng * nb * kp))
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        r = r1 - r0
        w = torch.zeros((r, kp), dtype=torch.float32, device=dev)
        w[:, :k] = W[r0:r1]
        q = torch.zeros((r, kp), dtype=torch.float32, device=dev)
        q[:, :k] = codes[r0:r1].float()
        s0, z0 = scales[r0:r1], zeros[r0:r1]
        if free_zero:
            ones = torch.zeros((r, kp), dtype=torch.float32, device=dev)
            ones[:, :k] = 1.0
            basis = torch.stack([q.view(r, ng, g), ones.view(r, ng, g)], 2)  # (r, G, 2, g)
            theta0 = torch.stack([s0, -s0 * z0], 2)  # (r, G, 2)
        else:
            qz = q.clone()
            qz[:, :k] -= z0[:, idx]
            basis = qz.view(r, ng, 1, g)
            theta0 = s0.unsqueeze(2)
        # T[b, (i, d), :] = basis[i, b, d, :] @ Hd[group b rows, :]: one batched GEMM over the groups.
        T = torch.bmm(basis.permute(1, 0, 2, 3).reshape(ng, r * nb, g), Hblk).view(ng, r, nb, ng, g)
        # M[i, (a, c), (b, d)] = sum_{j in a} basis[i, a, c, j] * T[b, i, d, a, j]
        M = torch.einsum("iacj,bidaj->iacbd", basis, T).reshape(r, ng * nb, ng * nb)
        v = torch.einsum("iacj,iaj->iac", basis, (w @ Hd).view(r, ng, g)).reshape(r, ng * nb)
        # A group whose codes are all equal makes (q, 1) collinear: a ridge
        # towards the current parameters keeps every system well posed.
        lam = 1e-7 * M.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-30)
        M.diagonal(dim1=1, dim2=2).add_(lam[:, None])
        theta = torch.linalg.solve(M, v + lam[:, None] * theta0.reshape(r, -1)).view(r, ng, nb)
        s1 = theta[..., 0]
        z1 = -theta[..., 1] / s1 if free_zero else z0
        s1 = s1.to(fmt.scale_dtype).float()
        z1 = z1.to(fmt.scale_dtype).float() if free_zero else z1
        e_old = _row_errors((q[:, :k] - z0[:, idx]) * s0[:, idx], w[:, :k], Hd[:k, :k])
        e_new = _row_errors((q[:, :k] - z1[:, idx]) * s1[:, idx], w[:, :k], Hd[:k, :k])
        ok = (e_new < e_old) & (s1 > 0).all(1) & torch.isfinite(z1).all(1)  # NaN compares False
        out_s[r0:r1] = torch.where(ok[:, None], s1, s0)
        out_z[r0:r1] = torch.where(ok[:, None], z1, z0)
        changed += int(ok.sum())
    return out_s, out_z, changed
