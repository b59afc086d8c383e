"""AWQ's folds in a decoder block: where each group's scale goes, and the check
that the float block still computes the same function afterwards.

Where (:func:`plan`): the model family's adapter names the producer
(``pyquant.pipeline.arch``); without an adapter rule, the producer is the
module whose output the group reads, found by running the block. A norm is
probed for how it applies its weight (``x * w``, ``x * (1 + w)``, with or
without bias); a norm that computes anything else cannot take a fold. No
producer at all (an activation's output): an explicit input scale
(``ScaledInputLinear``), exact by construction.

The check (:class:`FoldCheck`): before a block's first fold, the float block
runs on one calibration sequence and its output and every group's input are
kept (a wrong fold changes every token; one sequence keeps the check to a few
percent of AWQ's time).
A fold is applied, the block runs again, and it stays only if the group's
input times ``s`` and the block's output both match the float ones to a
relative :func:`tolerance` (1e-4 in float32); otherwise the weights are put
back bit for bit. Folds happen before any weight of the block is quantized.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..algorithms.awq_fold import (
    NormForm, ScaledInputLinear, fold_into_norm, fold_into_rows, gqa_tie, probe_norm, scale_columns, untie,
)
from ..errors import FormatError
from .arch import Adapter, FoldRule, attention_heads
from .capture import layer_inputs, set_module

FOLD_TOL = 1e-4


def tolerance(dtype: torch.dtype) -> float:
    """The relative change a fold may cause: 1e-4 for float32 blocks; a 16-bit
    block's own rounding of the folded weights is above that (bf16 keeps 8
    bits), so there it is 4 ulps of the dtype."""
    eps = torch.finfo(dtype).eps
    return FOLD_TOL if eps < 1e-6 else max(FOLD_TOL, 4 * eps)


@dataclasses.dataclass
class FoldTarget:
    """Where a group's ``1/s`` goes. ``kind``: "norm", "linear" (output rows of a
    linear), "input" (an explicit input scale) or "none" (``reason`` says why)."""

    kind: str
    producer: Optional[str] = None  # block-relative name
    module: Optional[nn.Module] = None
    form: Optional[NormForm] = None  # kind "norm"
    rows: Optional[Tuple[int, int]] = None  # kind "linear": the producer's rows the group reads (None: all)
    tie: Optional[torch.Tensor] = None  # channels sharing one producer row (grouped-query attention)
    n_cls: int = 0  # producer rows the scale folds into
    reason: str = ""

    def describe(self) -> str:
        if self.kind == "norm":
            return f"folded into norm {self.producer} ({self.form.describe()})"
        if self.kind == "linear":
            rows = "" if self.rows is None else f" rows {self.rows[0]}:{self.rows[1]}"
            return f"folded into linear {self.producer}{rows}"
        if self.kind == "input":
            return "explicit input scale"
        return self.reason

    def producer_class(self) -> str:
        return type(self.module).__name__ if self.module is not None else "-"


def cannot_fold(reason: str, producer: Optional[str] = None, module: Optional[nn.Module] = None) -> FoldTarget:
    return FoldTarget("none", producer, module, reason=reason)


def _norm_target(name: str, mod: nn.Module, width: int) -> FoldTarget:
    form = probe_norm(mod, width)
    if form is None:
        return cannot_fold(f"{name} ({type(mod).__name__}) computes neither x * w nor x * (1 + w) "
                     f"with a {width}-wide weight", name, mod)
    return FoldTarget("norm", name, mod, form=form, n_cls=width)


def from_rule(block: nn.Module, rule: FoldRule, width: int, family: str) -> FoldTarget:
    """The target an adapter rule names, checked against the block's modules."""
    try:
        mod = block.get_submodule(rule.producer)
    except AttributeError:
        return cannot_fold(f"the {family} adapter's producer {rule.producer!r} is not in the block", rule.producer)
    if not isinstance(mod, nn.Linear):
        return _norm_target(rule.producer, mod, width)
    rows = rule.rows(block) if rule.rows is not None else None
    start, stop = rows if rows is not None else (0, mod.out_features)
    n_rows = stop - start
    if rule.heads is None:
        if n_rows != width:
            return cannot_fold(f"{rule.producer} rows {start}:{stop} do not match the {width} inputs",
                               rule.producer, mod)
        return FoldTarget("linear", rule.producer, mod, rows=rows, n_cls=width)
    try:
        n_heads, n_kv, head_dim = attention_heads(block, rule.heads)
    except (AttributeError, FormatError) as exc:
        return cannot_fold(str(exc), rule.producer, mod)
    if n_heads * head_dim != width or n_kv * head_dim != n_rows or n_heads % n_kv:
        return cannot_fold(f"{n_heads} heads / {n_kv} kv heads of {head_dim} do not match {width} inputs and "
                     f"{n_rows} value rows of {rule.producer}", rule.producer, mod)
    tie = gqa_tie(n_heads, n_kv, head_dim, mod.weight.device)
    return FoldTarget("linear", rule.producer, mod, rows=rows, tie=tie, n_cls=n_rows)


def from_graph(block: nn.Module, producer: Optional[str], width: int) -> FoldTarget:
    """The target found by running the block: the module whose output the group reads."""
    if producer is None:
        return FoldTarget("input", n_cls=width)
    mod = block.get_submodule(producer)
    if isinstance(mod, nn.Linear) and mod.out_features == width:
        return FoldTarget("linear", producer, mod, n_cls=width)
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == width and not isinstance(mod, nn.Embedding):
        return _norm_target(producer, mod, width)
    return FoldTarget("input", n_cls=width)


def plan(block: nn.Module, group: Sequence[str], linears: Dict[str, nn.Linear], producer: Optional[str],
         adapter: Optional[Adapter]) -> FoldTarget:
    width = linears[group[0]].in_features
    rule = adapter.rule_for(group) if adapter is not None else None
    if rule is not None:
        return from_rule(block, rule, width, adapter.family)
    return from_graph(block, producer, width)


class FoldCheck:
    """The float block's output and every group's input on calibration inputs ``x``,
    taken before the block's first fold; :meth:`error` measures a fold against them."""

    def __init__(self, block: nn.Module, x: torch.Tensor, kw: dict, firsts: Dict[str, nn.Module]):
        self.block, self.x, self.kw, self.firsts = block, x, kw, firsts
        self.out, self.inputs = layer_inputs(block, x, kw, firsts)
        self.tol = tolerance(x.dtype)

    def error(self, first: str, s: torch.Tensor) -> Tuple[float, float]:
        """Relative change of the group's input times ``s`` and of the block's output."""
        out, seen = layer_inputs(self.block, self.x, self.kw, {first: self.firsts[first]})
        return _rel(seen[first].float() * s, self.inputs[first].float()), _rel(out.float(), self.out.float())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.norm())
    err = float((a - b).norm())
    if den == 0:
        return 0.0 if err == 0 else float("inf")
    return err / den  # NaN when a is not finite: fails any <= test


def apply(block: nn.Module, target: FoldTarget, consumers: List[str], linears: Dict[str, nn.Linear],
          s: torch.Tensor) -> Callable[[], None]:
    """Scale ``consumers``' input columns by ``s`` and put ``1/s`` into ``target``.
    Returns the function that puts every touched weight back exactly."""
    touched = [linears[n].weight for n in consumers]
    if target.kind in ("norm", "linear"):
        touched += [t for t in (target.module.weight, getattr(target.module, "bias", None)) if t is not None]
    saved = [(t, t.detach().clone()) for t in touched]
    for n in consumers:
        scale_columns(linears[n], s)
    if target.kind == "norm":
        fold_into_norm(target.module, s, target.form.offset)
    elif target.kind == "linear":
        fold_into_rows(target.module, untie(s, target.tie, target.n_cls), target.rows)
    elif target.kind == "input":
        for n in consumers:
            set_module(block, n, ScaledInputLinear(linears[n], s))

    @torch.no_grad()
    def revert() -> None:
        for t, v in saved:
            t.copy_(v)
        if target.kind == "input":
            for n in consumers:
                set_module(block, n, linears[n])

    return revert


def apply_checked(check: FoldCheck, target: FoldTarget, group: Sequence[str], consumers: List[str],
                  linears: Dict[str, nn.Linear], s: torch.Tensor) -> Optional[str]:
    """Apply the fold and keep it if the float block's function is unchanged;
    None when kept, else why it was undone."""
    revert = apply(check.block, target, consumers, linears, s)
    e_in, e_out = check.error(group[0], s)
    if e_in <= check.tol and e_out <= check.tol:
        return None
    revert()
    where = f"{target.producer} ({target.producer_class()})" if target.producer else "an input scale"
    return (f"the fold into {where} changes the group's input by {e_in:.1e} and the block's output by "
            f"{e_out:.1e} (relative, > {check.tol:.0e})")
