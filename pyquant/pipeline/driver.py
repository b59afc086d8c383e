"""``quantize_model``: quantize every selected linear layer of a model, block by block.

    report = pyquant.quantize_model(model, pyquant.QuantConfig("gptq", bits=4, group_size=64), ids)

Methods without calibration (RTN, HQQ, NF4, GGUF types) quantize layer by
layer (``passes/plain.py``) and accept ``calibration_data=None``. HQQ given
calibration data checks each block against RTN by the model's loss on it
(``passes/hqq_checked.py``, ``QuantConfig.hqq_fallback``).

Calibrated methods (GPTQ, AWQ) capture the first decoder block's inputs
(``capture.py``), then for each block: group its linear layers by shared
input, hand the block to the method's pass (``passes/gptq.py``,
``passes/awq.py``) as a :class:`~pyquant.pipeline.passes.BlockContext`, and
run the quantized block on the captured inputs: these outputs are the next
block's inputs. Peak memory is one block plus the calibration activations
(n_samples x seq_len x hidden, twice).

Linear layers the filter selects outside the decoder blocks get RTN with a
note in the report (calibrating them would need their own capture pass).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..config import QuantConfig
from ..errors import FormatError, ValueRangeError
from ..methods import METHODS
from ..nn import QuantLinear
from . import passes
from .arch import adapter_for, family_of
from .capture import (
    block_groups, calibration_batches, capture_first_block, find_blocks, model_device, move_outside, run_block,
    select_targets, vocab_size,
)
from .passes import BlockContext, hqq_checked, plain
from .report import Log, QuantReport, record_sizes


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration_data=None,
    *,
    filter: Optional[Callable[[str, nn.Module], bool]] = None,
    device: Union[str, torch.device, None] = None,
    offload: bool = False,
    progress: bool = True,
    verbose: bool = False,
    kernel: str = "auto",
) -> QuantReport:
    """Replace, in place, the selected ``nn.Linear`` layers of ``model`` by
    ``QuantLinear`` modules quantized as ``config`` says. Returns a
    :class:`QuantReport` (one :class:`LayerRecord` per layer). ``progress``:
    one progress bar on stderr, then the report's closing summary table.
    ``verbose``: also a line per layer on stderr (otherwise those lines go to
    the ``pyquant`` logger at INFO level).

    ``calibration_data``: LongTensor (n_samples, seq_len) of token ids, or an
    iterable of such tensors (or 1-D sequences); needed by GPTQ and AWQ, read
    by HQQ's block check (``QuantConfig.hqq_fallback``), ignored by the others.
    ``filter(name, module) -> bool`` picks the layers
    (default: every linear but the output head). ``device``: where blocks are
    processed (default: the model's device; blocks are moved there one at a
    time and moved back afterwards). ``offload``: move each finished block to
    the CPU. ``kernel`` is forwarded to the QuantLinear modules.

    AWQ folds its scales into the layers that produce each group's input, as
    the model family's adapter (``pyquant.pipeline.arch``) or the block's data
    flow says, and keeps a fold only where the float block still computes the
    same function on calibration data; see ``QuantConfig.awq_strict_folds``.
    """
    if not isinstance(config, QuantConfig):
        raise FormatError(f"config must be a pyquant.QuantConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise FormatError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    method = METHODS[config.method]
    if method.needs_calibration:
        block_pass = passes.load(method.block_pass)
        return run(model, config, calibration_data, filter=filter, device=device, offload=offload,
                   progress=progress, verbose=verbose, kernel=kernel, block_fn=block_pass.quantize_block,
                   check_fn=block_pass.check_model)
    t_start = time.perf_counter()
    report = QuantReport(config)
    targets = select_targets(model, filter)
    sizes = _float_sizes(targets)
    # calibration-free methods: only HQQ's block check reads the data
    checked = config.reads_calibration and calibration_data is not None
    if checked:
        batches = hqq_checked.check_batches(
            calibration_batches(calibration_data, config.batch_size, config.min_tokens, vocab_size(model)),
            config.hqq_check_tokens)
        report.n_tokens = sum(b.numel() for b in batches)
        log = Log(report, verbose, progress, len(hqq_checked.units(model, targets)), "hqq blocks")
    else:
        log = Log(report, verbose, progress, len(targets), config.method)
    was_training = model.training
    try:
        if checked:
            model.eval()
            hqq_checked.quantize_layers(model, targets, config, batches, log, kernel)
        else:
            with torch.no_grad():
                plain.quantize_layers(model, targets, config, log, kernel)
    finally:
        log.close()
        model.train(was_training)
    report.seconds = time.perf_counter() - t_start
    _close(report, model, targets, sizes, progress or verbose)
    return report


def _float_sizes(targets):
    """(bytes, weights) of the selected layers' float weights, before they are replaced."""
    return (sum(m.weight.numel() * m.weight.element_size() for m in targets.values()),
            sum(m.weight.numel() for m in targets.values()))


def _close(report: QuantReport, model, targets, sizes, show: bool) -> None:
    packed = [m for m in (model.get_submodule(n) for n in targets) if isinstance(m, QuantLinear)]
    record_sizes(report, *sizes, packed)
    if show:
        print(report.summary(), file=sys.stderr, flush=True)


def run(model, cfg: QuantConfig, data, *, filter, device, offload: bool, progress: bool, verbose: bool, kernel: str,
        block_fn: Callable[[BlockContext], None], check_fn=None, quantize_outside: bool = True) -> QuantReport:
    """The calibrated loop: capture, then ``block_fn`` on each decoder block in
    turn, feeding each block's outputs to the next. ``check_fn`` vets the model
    before anything changes; ``quantize_outside``: RTN for the selected layers
    outside the blocks."""
    t_start = time.perf_counter()
    report = QuantReport(cfg)
    targets = select_targets(model, filter)
    sizes = _float_sizes(targets)
    with torch.no_grad():
        _run_blocks(model, cfg, data, targets, report, device, offload, progress, verbose, kernel, block_fn,
                    check_fn, quantize_outside)
    report.seconds = time.perf_counter() - t_start
    _close(report, model, targets, sizes, progress or verbose)
    return report


def _run_blocks(model, cfg, data, targets, report, device, offload, progress, verbose, kernel, block_fn, check_fn,
                quantize_outside):
    fmt = cfg.format()
    blocks_name, blocks = find_blocks(model)
    family, adapter = family_of(model), adapter_for(model)
    batches = calibration_batches(data, cfg.batch_size, cfg.min_tokens, vocab_size(model))
    if check_fn is not None:
        check_fn(model, blocks_name, blocks, cfg, adapter, family)
    n_tokens = sum(b.numel() for b in batches)
    report.n_tokens = n_tokens
    home = model_device(model)
    dev = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    if dev != home:
        move_outside(model, blocks, dev)
    log = Log(report, verbose, progress, len(blocks), f"{cfg.method} blocks")
    try:
        inps, kws = capture_first_block(model, blocks, batches, dev)
        max_k = max(m.in_features for m in targets.values())
        if n_tokens < max_k:
            log.warn(f"{n_tokens} calibration tokens < {max_k} input features: the Hessians are rank-deficient; "
                     "damping keeps them invertible but more tokens give better results")
        for bi, block in enumerate(blocks):
            prefix = f"{blocks_name}.{bi}"
            block_home = model_device(block)
            block.to(dev)
            names = {n: f"{prefix}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)}
            selected = [n for n, full in names.items() if full in targets]
            if selected:
                groups, producers, linears = block_groups(block, inps[0], kws[0])
                block_fn(BlockContext(block, prefix, groups, producers, linears, selected, inps, kws, cfg, fmt, log,
                                      kernel, adapter, family))
            for i in range(len(inps)):
                inps[i] = run_block(block, inps[i], kws[i])
                if not bool(torch.isfinite(inps[i]).all()):
                    raise ValueRangeError(f"block {prefix} produced NaN/Inf outputs after quantization")
            if offload:
                block.to("cpu")
            elif block_home != dev:
                block.to(block_home)
            log.step("block")
        if quantize_outside:
            # RTN has no column order: an act-order format stores the plain layout here.
            rtn_fmt = dataclasses.replace(fmt, act_order=False) if getattr(fmt, "act_order", False) else fmt
            for name, mod in targets.items():
                if not name.startswith(blocks_name + "."):
                    plain.quantize_layer(model, name, mod, "rtn", rtn_fmt, {}, log, kernel,
                                         "outside the decoder blocks: no calibration")
    finally:
        log.close()
        if dev != home:
            move_outside(model, blocks, home)
        model.train(was_training)
