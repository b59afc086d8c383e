"""AWQ, block by block (the algorithm: ``pyquant.algorithms.awq``).

1. one float pass collects each group's Gram matrix and ``mean|x|``;
2. group by group, in execution order: search the input scale ``s``, fold it
   (``pyquant.pipeline.folds``: into the producer the family's adapter or the
   block's data flow names, checked to keep the float block's function; a
   fold that does not is undone and the group stays unscaled, or with
   ``awq_strict_folds`` the call raises);
3. clip each layer's ranges and round it.

Every fold of a block is in place before any of its weights is quantized.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from ...algorithms import awq as A
from ...algorithms.awq_fold import ScaledInputLinear
from ...config import QuantConfig
from ...errors import FormatError
from ...methods import METHODS
from ...nn.quant_linear import QuantLinear
from .. import folds
from ..arch import ADAPTERS, GENERIC, Adapter
from ..capture import accumulate_all, group_accumulator, on_one_sequence
from ..report import LayerRecord, QuantReport
from . import BlockContext, check_weight, layer_error, rel_error


@dataclasses.dataclass
class _Scaled:
    """A selected layer after step 2."""

    gram: torch.Tensor  # X^T X of its (scaled) input
    note: str
    seconds: float  # its share of the search
    explicit: Optional[torch.Tensor] = None  # s, when an explicit input scale carries 1/s


def _strict_error(prefix: str, group: List[str], target: folds.FoldTarget, why: str) -> FormatError:
    producer = f"{prefix}.{target.producer}" if target.producer else "no producer"
    return FormatError(
        f"AWQ (awq_strict_folds=True): the scale of {prefix}.{group[0]} (group {', '.join(group)}) cannot be "
        f"folded into {producer} ({target.producer_class()}): {why}"
    )


def check_model(model: nn.Module, blocks_name: str, blocks: nn.ModuleList, cfg: QuantConfig,
                adapter: Optional[Adapter], family: str) -> None:
    """With ``awq_strict_folds``, refuse a family without an adapter, and any
    block whose adapter rules do not fit (a missing module, a norm of unknown
    form) before anything is changed."""
    if not cfg.awq_strict_folds:
        return
    if adapter is None:
        raise FormatError(
            f"AWQ (awq_strict_folds=True): no fold adapter for model family {family!r} "
            f"(adapters: {', '.join(sorted(ADAPTERS))}); with awq_strict_folds=False AWQ folds only where it "
            "verifies that the block's function is unchanged"
        )
    for i, block in enumerate(blocks):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        for rule in adapter.rules:
            missing = [n for n in rule.consumers if n not in linears]
            target = (folds.cannot_fold(f"the {family} adapter's layers {missing} are not in the block")
                      if missing else folds.from_rule(block, rule, linears[rule.consumers[0]].in_features, family))
            if target.kind == "none":
                raise _strict_error(f"{blocks_name}.{i}", list(rule.consumers), target, target.reason)


def fold_block(ctx: BlockContext) -> Dict[str, _Scaled]:
    """Steps 1 and 2: statistics, scale search and verified folds, for every selected layer."""
    accs = [group_accumulator(ctx.linears, ctx.prefix, g, abs_mean=True) for g in ctx.groups]
    accumulate_all(ctx.block, [(ctx.linears[g[0]], acc) for g, acc in zip(ctx.groups, accs)], ctx.inps, ctx.kws)
    # The float block, before any fold: one sequence is enough to show a wrong fold.
    firsts = {g[0]: ctx.linears[g[0]] for g in ctx.groups}
    check = on_one_sequence(lambda x, kw: folds.FoldCheck(ctx.block, x, kw, firsts), ctx.inps[0], ctx.kws[0])
    out: Dict[str, _Scaled] = {}
    for g, acc in zip(ctx.groups, accs):
        sel = [n for n in g if n in ctx.selected]
        if sel:
            t0 = time.perf_counter()
            gram = acc.gram.clone()
            note, explicit = _scale_group(ctx, g, sel, acc.abs_mean(), gram, check)
            seconds = (time.perf_counter() - t0) / len(sel)
            out.update({n: _Scaled(gram, note, seconds, explicit) for n in sel})
    return out


def _scale_group(ctx: BlockContext, g: List[str], sel: List[str], x_mean: torch.Tensor, gram: torch.Tensor,
                 check: folds.FoldCheck):
    """Search and fold the scale of group ``g`` (``gram`` follows the scaled input).
    Returns the note and, for an explicit input scale, ``s``."""
    cfg = ctx.cfg
    target = folds.plan(ctx.block, g, ctx.linears, ctx.producers.get(g[0]), ctx.adapter)
    if target.kind == "none":
        return _refuse(ctx, g, target, target.reason), None
    res = A.awq_search_scale([ctx.linears[n].weight for n in sel], gram, x_mean, ctx.fmt, grid=cfg.awq_grid,
                             duo_scaling=cfg.awq_duo_scaling, tie=target.tie, max_rows=cfg.awq_max_rows)
    if res.ratio == 0.0:
        return "scale search kept s=1", None
    s = res.scale
    found = f"alpha={res.ratio:.2f}{' duo' if res.duo else ''}"
    # An explicit input scale goes on the selected layers only; a fold changes every reader's columns.
    consumers = sel if target.kind == "input" else list(g)
    why = folds.apply_checked(check, target, g, consumers, ctx.linears, s)
    if why is not None:
        return f"{found} found, " + _refuse(ctx, g, target, why), None
    gram.div_(s.unsqueeze(0) * s.unsqueeze(1))
    return f"{found}, {target.describe()}", (s if target.kind == "input" else None)


def _refuse(ctx: BlockContext, group: List[str], target: folds.FoldTarget, why: str) -> str:
    """A group left unscaled: the note (and a report warning), or the strict error."""
    if ctx.cfg.awq_strict_folds:
        raise _strict_error(ctx.prefix, group, target, why)
    ctx.log.warn(f"{ctx.full(group[0])}: AWQ scale not applied, {why}")
    return f"unscaled: {why}"


def quantize_block(ctx: BlockContext) -> None:
    scaled = fold_block(ctx)
    cfg = ctx.cfg
    method = METHODS["awq"]
    adapter = ctx.adapter or GENERIC
    for name in ctx.selected:
        t0 = time.perf_counter()
        plan = scaled[name]
        mod = ctx.linears[name]
        full = ctx.full(name)
        w = mod.weight.detach().float()
        check_weight(full, w)
        note, shrink = plan.note, None
        if cfg.awq_clip and (cfg.awq_clip_qk or adapter.clips(name)):
            shrink = A.awq_clip_search(w, plan.gram, ctx.fmt, grid=cfg.awq_clip_grid,
                                       max_shrink=cfg.awq_clip_max_shrink)
            note += ", clipped"
        try:
            qw = method.quantize(w, ctx.fmt, shrink=shrink).to(mod.weight.device)
        except (ValueError, TypeError) as exc:
            raise layer_error(full, w, exc) from exc
        dq = qw.dequantize(torch.float32)
        new: nn.Module = QuantLinear(qw, mod.bias, kernel=ctx.kernel)
        if plan.explicit is not None:
            new = ScaledInputLinear(new, plan.explicit)
        ctx.replace(name, new)
        ctx.record(LayerRecord(full, "awq", A.output_error(dq - w, plan.gram), rel_error(w, dq, plan.gram),
                               time.perf_counter() - t0 + plan.seconds, note))


def _record_folds(ctx: BlockContext) -> None:
    for name, plan in fold_block(ctx).items():
        ctx.record(LayerRecord(ctx.full(name), "awq", None, 0.0, plan.seconds, plan.note))


def fold_model(model: nn.Module, config: QuantConfig, calibration_data, *, filter=None, device=None,
               progress: bool = False, verbose: bool = False) -> QuantReport:
    """AWQ's scale search and folds without the rounding: the model stays float
    (and, where every fold verified, computes what it computed before), its
    selected linears scaled. The report has one record per selected layer whose
    note says where its scale went (``error`` is 0: nothing was rounded)."""
    from ..driver import run

    if config.method != "awq":
        raise FormatError(f"fold_model runs AWQ's folds; got a config for {config.method!r}")
    return run(model, config, calibration_data, filter=filter, device=device, offload=False, progress=progress,
               verbose=verbose, kernel="auto", block_fn=_record_folds, quantize_outside=False)
