"""Where AWQ's scale goes: the weight surgery that keeps the float model's function.

AWQ multiplies the input columns of a group's linear layers by ``s`` and
divides their input by ``s``; the division is folded into whatever produced
that input:

* a norm: its affine weight (and bias). Norms differ in how the weight enters:
  Llama's RMSNorm and LayerNorm compute ``n(x) * w (+ b)``, Gemma's
  ``n(x) * (1 + w)``. :func:`probe_norm` finds out by running the module on a
  probe input with chosen weights (never by class name), so a norm that
  computes something else is reported instead of silently mis-folded;
* the output rows of a preceding linear (``v_proj`` for ``o_proj``, ``up_proj``
  for ``down_proj``), or a slice of them when the linear is fused (Phi-3's
  ``qkv_proj``, ``gate_up_proj``). With grouped-query attention, ``o_proj``'s
  channels that read one value channel share one scale (:func:`gqa_tie`);
* nothing: :class:`ScaledInputLinear` multiplies the layer's input by ``1/s``.

Which producer a group has is the pipeline's business
(``pyquant.pipeline.arch`` and ``pyquant.pipeline.folds``, which also checks
every fold on calibration activations before it is kept).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn

# The weight offsets of the norms we know how to fold into: y = n(x) * (offset + w) [+ b].
NORM_OFFSETS = (0.0, 1.0)
_PROBE_TOL = 1e-5  # float32 probe: the norm's own rounding is ~1e-7


@dataclasses.dataclass(frozen=True)
class NormForm:
    """What an affine norm computes: ``n(x) * (offset + weight) [+ bias]``."""

    offset: float
    bias: bool

    def describe(self) -> str:
        w = "w" if self.offset == 0 else f"({self.offset:g} + w)"
        return f"x * {w}" + (" + b" if self.bias else "")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float("inf")


@torch.no_grad()
def probe_norm(norm: nn.Module, width: int) -> Optional[NormForm]:
    """How ``norm`` applies its 1-D ``weight`` (and ``bias``) of ``width``
    channels, found numerically on a float32 copy: the copy is run with the
    weight at 0, at 1, and at random values; the outputs must be ``n(x) * (a + w)
    [+ b]`` for one offset ``a`` of :data:`NORM_OFFSETS`. None when the module
    has no such weight or computes anything else."""
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 1 or w.numel() != width:
        return None
    if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != (width,)):
        return None
    probe = copy.deepcopy(norm).float()
    gen = torch.Generator().manual_seed(0)
    # A nonzero mean and uneven channels, so that centering (LayerNorm) and RMS scaling both act.
    x = (torch.randn(4, width, generator=gen) * 3 + 0.5).to(w.device)
    rand_w = (torch.rand(width, generator=gen) + 0.5).to(w.device)
    rand_b = torch.randn(width, generator=gen).to(w.device)

    def run(weight, bias):
        probe.weight.copy_(weight)
        if b is not None:
            probe.bias.copy_(bias)
        out = probe(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise ValueError("not an elementwise norm")
        return out.float()

    try:
        zero = torch.zeros_like(rand_w)
        y0 = run(zero, zero)
        n = run(torch.ones_like(rand_w), zero) - y0  # n(x): the normalized input
        if not bool(torch.isfinite(n).all()) or float(n.norm()) == 0:
            return None
        offsets = [a for a in NORM_OFFSETS if float((y0 - a * n).norm()) <= _PROBE_TOL * float(n.norm())]
        if not offsets:
            return None
        a = offsets[0]
        y = run(rand_w, rand_b)
    except (RuntimeError, TypeError, ValueError):
        return None
    pred = n * (a + rand_w) + (rand_b if b is not None else 0.0)
    if _rel(y, pred) > _PROBE_TOL:
        return None
    return NormForm(a, b is not None)


@torch.no_grad()
def scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    linear.weight.mul_(s.to(linear.weight.dtype))


@torch.no_grad()
def fold_into_rows(linear: nn.Linear, s: torch.Tensor, rows: Optional[Tuple[int, int]] = None) -> None:
    """Divide the outputs of ``linear`` by ``s`` (its rows and bias); ``rows``:
    only output rows ``[start, stop)`` (a fused projection), ``len(s)`` of them."""
    start, stop = rows if rows is not None else (0, linear.out_features)
    linear.weight[start:stop].div_(s.to(linear.weight.dtype).unsqueeze(1))
    if linear.bias is not None:
        linear.bias[start:stop].div_(s.to(linear.bias.dtype))


@torch.no_grad()
def fold_into_norm(norm: nn.Module, s: torch.Tensor, offset: float = 0.0) -> None:
    """Divide the outputs of an affine norm computing ``n(x) * (offset + w) [+ b]``
    by ``s`` (``offset`` from :func:`probe_norm`: 0 for RMSNorm/LayerNorm, 1 for
    Gemma's RMSNorm)."""
    w = norm.weight
    if offset == 0:
        w.div_(s.to(w.dtype))
    else:
        w.copy_(((w.float() + offset) / s.float() - offset).to(w.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))


def gqa_tie(num_heads: int, num_kv_heads: int, head_dim: int, device=None) -> Optional[torch.Tensor]:
    """Tie classes of o_proj's input channels: channel ``h * head_dim + d`` reads
    value channel ``(h // (num_heads // num_kv_heads)) * head_dim + d``; the
    class is that value channel. None without grouping (classes = channels)."""
    if num_kv_heads == num_heads:
        return None
    rep = num_heads // num_kv_heads
    h = torch.arange(num_heads, device=device).repeat_interleave(head_dim)
    d = torch.arange(head_dim, device=device).repeat(num_heads)
    return (h // rep) * head_dim + d


def untie(s_full: torch.Tensor, tie: Optional[torch.Tensor], n_cls: int) -> torch.Tensor:
    """The per-class value of a tied scale (each class's channels hold equal values)."""
    if tie is None:
        return s_full
    out = torch.empty(n_cls, dtype=s_full.dtype, device=s_full.device)
    out[tie] = s_full
    return out


class ScaledInputLinear(nn.Module):
    """``inner(x * inv_scale)``: AWQ's input scale where no producer can absorb it."""

    def __init__(self, inner: nn.Module, scale: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("inv_scale", (1.0 / scale.float()).to(scale.device))

    @property
    def in_features(self):
        return self.inner.in_features

    @property
    def out_features(self):
        return self.inner.out_features

    def forward(self, x):
        return self.inner(x * self.inv_scale.to(x.dtype))
