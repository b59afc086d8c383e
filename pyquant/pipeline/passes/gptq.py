"""GPTQ, block by block: for each group of linears sharing one input, in
execution order, ``H = 2/n X^T X`` from that input (true-sequential: with the
earlier groups already quantized, the forward stopping at the group), then
each layer of the group through the table's per-weight function."""
from __future__ import annotations

import time

import torch

from ...methods import METHODS
from ...nn.quant_linear import QuantLinear
from ..capture import accumulate, accumulate_all, group_accumulator
from ..report import LayerRecord
from . import BlockContext, check_weight, layer_error, rel_error


def check_model(model, blocks_name, blocks, cfg, adapter, family) -> None:
    """GPTQ needs nothing of the architecture beyond its blocks."""


def quantize_block(ctx: BlockContext) -> None:
    todo = [[n for n in g if n in ctx.selected] for g in ctx.groups]
    todo = [g for g in todo if g]
    if ctx.cfg.true_sequential:
        accs = [None] * len(todo)
    else:
        # One pass collects every group's Hessian from the float block.
        accs = [group_accumulator(ctx.linears, ctx.prefix, g) for g in todo]
        accumulate_all(ctx.block, [(ctx.linears[g[0]], acc) for g, acc in zip(todo, accs)], ctx.inps, ctx.kws)
    for g, acc in zip(todo, accs):
        if acc is None:
            acc = group_accumulator(ctx.linears, ctx.prefix, g)
            accumulate(ctx.block, ctx.linears[g[0]], ctx.inps, ctx.kws, acc)
        H = acc.hessian()
        for name in g:
            _quantize_layer(ctx, name, H)


def _quantize_layer(ctx: BlockContext, name: str, H) -> None:
    t0 = time.perf_counter()
    method = METHODS["gptq"]
    mod = ctx.linears[name]
    full = ctx.full(name)
    w = mod.weight.detach()
    check_weight(full, w)
    try:
        res = method.quantize(w, ctx.fmt, hessian=H, **method.config_options(ctx.cfg))
    except (ValueError, TypeError) as exc:
        raise layer_error(full, w, exc) from exc
    qw = res.qweight.to(w.device)
    notes = []
    if res.damp_retries:
        notes.append(f"Cholesky failed, damp raised to {res.damp:g}")
    if res.dead_columns:
        notes.append(f"{res.dead_columns} dead inputs")
    if ctx.cfg.gptq_refit and res.refit_rows < w.shape[0]:
        notes.append(f"refit kept the GPTQ parameters of {w.shape[0] - res.refit_rows} rows")
    err = rel_error(w, qw.dequantize(torch.float32), H)
    ctx.replace(name, QuantLinear(qw, mod.bias, kernel=ctx.kernel))
    ctx.record(LayerRecord(full, "gptq", res.loss, err, time.perf_counter() - t0, "; ".join(notes)))
    if res.damp_retries:
        ctx.log.report.warnings.append(f"{full}: {notes[0]}")
