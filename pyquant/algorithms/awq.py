"""AWQ (Lin et al., 2023): activation-aware per-channel scaling, then clipping
and round to nearest.

For the linear layers that read the same input ``x`` (K channels) — q/k/v,
gate/up, or a single o/down projection — AWQ searches a per-input-channel
scale ``s`` and quantizes ``W diag(s)`` while the input becomes
``x / s``; ``1/s`` is folded into whatever produced ``x`` (an RMSNorm's
weight, the rows of a preceding linear), so the float model is unchanged and
the salient channels (large ``mean|x|``) get finer effective quantization.

Search (``awq_search_scale``)
    ``s = mean|x|^a`` (normalised by ``sqrt(max s * min s)``) for
    ``a = i / grid``, i = 0..grid-1, and/or the duo-scaling variant
    ``s = mean|x|^a / mean_w^(1-a)`` (``mean_w``: per-channel mean of
    ``|w| / max|w|`` within each group, as in AutoAWQ). ``a = 0`` is plain RTN,
    so the search never does worse than RTN on its loss.
Loss
    the output error of the group's linear layers on all calibration tokens,
    ``sum_l tr(dW_l G dW_l^T)`` with ``G = X^T X`` (the Gram matrix shared
    with GPTQ's Hessian) and ``dW = Q(W s) / s - W``. AutoAWQ measures the
    output of the whole attention/MLP module instead; the Gram form is exact
    for the linear outputs, uses every calibration token and costs one
    ``N x K x K`` product per grid point instead of a module forward.
Clipping (``awq_clip_search``)
    per (row, group) shrink of the quantization range in
    ``1 - j * max_shrink / grid`` minimising the group's share of the output
    error ``d^T G_gg d`` (AutoAWQ measures the same per-group partial outputs on
    a token sample).

Where ``1/s`` goes (into a norm, the rows of a preceding linear, or an
explicit input scale) is ``pyquant.algorithms.awq_fold``; which producer a
group has, and the check that a fold keeps the float function, is the
pipeline's (``pyquant.pipeline.arch``, ``pyquant.pipeline.folds``).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

from ..formats import Int, QuantizedWeight
from ..ops.primitives import fake_quant, group_params, pad_groups, search_shrink
from .rtn import rtn_int


@dataclasses.dataclass
class AWQScale:
    scale: torch.Tensor  # (K,) fp32; weights are multiplied by it, inputs divided
    ratio: float
    duo: bool
    loss: float  # output error at the chosen scale
    loss_rtn: float  # output error of plain RTN (scale 1)


def rtn_dequant(w: torch.Tensor, fmt: Int, shrink: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RTN fake-quantization of fp32 ``w`` (N, K) with optional per-group shrink."""
    n, k = w.shape
    g = fmt.group_size_for(k)
    wg = pad_groups(w, g)
    s, z = group_params(wg, fmt, shrink)
    _, dq = fake_quant(wg, s.unsqueeze(-1), z.unsqueeze(-1), fmt.max_code)
    return dq.reshape(n, -1)[:, :k]


def output_error(dw: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr(dW G dW^T)``: squared output error summed over the calibration tokens."""
    return float(((dw @ gram) * dw).sum())


def _tie(v: torch.Tensor, tie: Optional[torch.Tensor]) -> torch.Tensor:
    """Average ``v`` over channels that share a tie class (``tie``: class id per channel)."""
    if tie is None:
        return v
    n_cls = int(tie.max()) + 1
    sums = torch.zeros(n_cls, dtype=v.dtype, device=v.device).index_add_(0, tie, v)
    counts = torch.zeros(n_cls, dtype=v.dtype, device=v.device).index_add_(0, tie, torch.ones_like(v))
    return (sums / counts)[tie]


def weight_mean(weights: Sequence[torch.Tensor], fmt: Int) -> torch.Tensor:
    """AutoAWQ's per-channel weight magnitude: mean over rows of |w| / group max |w|."""
    w = torch.cat([x.float() for x in weights], 0)
    n, k = w.shape
    wg = pad_groups(w.abs(), fmt.group_size_for(k))
    wg = wg / (wg.amax(-1, keepdim=True) + 1e-6)
    return wg.reshape(n, -1)[:, :k].mean(0)


def awq_search_scale(
    weights: Sequence[torch.Tensor],
    gram: torch.Tensor,
    x_mean: torch.Tensor,
    fmt: Int,
    grid: int = 20,
    duo_scaling="both",
    tie: Optional[torch.Tensor] = None,
    max_rows: Optional[int] = None,
) -> AWQScale:
    """Best input-channel scale for the layers ``weights`` (each (N_i, K)) that
    read inputs with Gram matrix ``gram`` (K, K) and ``mean|x|`` ``x_mean``.

    ``max_rows``: estimate the loss on that many evenly strided output rows
    (``loss``/``loss_rtn`` are then the estimate, not the full sum)."""
    ws = [w.detach().float() for w in weights]
    gram = gram.float()
    x_mean = _tie(x_mean.float(), tie)
    w_mean = _tie(weight_mean(ws, fmt), tie)
    total_rows = sum(w.shape[0] for w in ws)
    if max_rows and total_rows > max_rows:
        # The loss is a sum over output rows: an evenly strided subset of
        # rows estimates it at a fraction of the N x K x K cost per grid point.
        w_all = torch.cat(ws, 0)
        idx = torch.linspace(0, total_rows - 1, max_rows, device=w_all.device).round().long()
        ws = [w_all[idx]]
    variants = [False, True] if duo_scaling == "both" else [bool(duo_scaling)]

    def loss_for(s):
        total = 0.0
        for w in ws:
            total += output_error(rtn_dequant(w * s, fmt) / s - w, gram)
        return total

    ones = torch.ones_like(x_mean)
    loss_rtn = loss_for(ones)
    best = AWQScale(ones, 0.0, False, loss_rtn, loss_rtn)
    for duo in variants:
        for i in range(1, grid):
            a = i / grid
            if duo:
                s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)
            else:
                s = x_mean.pow(a)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            if not bool(torch.isfinite(s).all()):
                continue
            loss = loss_for(s)
            if loss < best.loss:
                best = AWQScale(s, a, duo, loss, loss_rtn)
    return best


def awq_clip_search(w: torch.Tensor, gram: torch.Tensor, fmt: Int, grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per-(row, group) range shrink of ``w`` (N, K) minimising each group's
    share ``d^T G_gg d`` of the output error. Returns (N, G) in (0, 1]."""
    n, k = w.shape
    g = fmt.group_size_for(k)
    ng = fmt.num_groups(k)
    gp = torch.zeros((ng * g, ng * g), dtype=torch.float32, device=w.device)
    gp[:k, :k] = gram.float()
    blocks = torch.stack([gp[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(ng)])
    return search_shrink(pad_groups(w.float(), g), fmt, grid=grid, max_shrink=max_shrink, weight=blocks)


def rtn_quantize(w: torch.Tensor, fmt: Int, shrink: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Pack ``w`` with RTN's rule (and the clipping ``shrink``)."""
    return rtn_int(w.float(), fmt, shrink)


__all__: List[str] = [
    "AWQScale", "awq_search_scale", "awq_clip_search", "rtn_quantize", "rtn_dequant", "output_error",
]  # the folds (scale_columns, fold_into_rows, fold_into_norm, ...) are awq_fold's
