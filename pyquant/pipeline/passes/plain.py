"""The calibration-free methods (RTN, HQQ, NF4, GGUF types): each selected layer
on its own, through ``pyquant.quantize_weight`` with the config's options."""
from __future__ import annotations

import time
from typing import Any, Dict

import torch
from torch import nn

from ...config import QuantConfig
from ...formats import Format
from ...nn.quant_linear import QuantLinear
from ...quantize import quantize_weight
from ..capture import set_module
from ..report import LayerRecord, Log
from . import layer_error, rel_error


def quantize_layer(model: nn.Module, name: str, mod: nn.Linear, method: str, fmt: Format, options: Dict[str, Any],
                   log: Log, kernel: str, note: str = "") -> None:
    """Replace ``model.<name>`` by a QuantLinear of ``quantize_weight(weight, fmt, method, **options)``."""
    t0 = time.perf_counter()
    w = mod.weight.detach()
    try:
        qw = quantize_weight(w, fmt, method, **options)
    except (ValueError, TypeError) as exc:
        raise layer_error(name, w, exc) from exc
    qw = qw.to(w.device)
    err = rel_error(w, qw.dequantize(torch.float32), None)
    set_module(model, name, QuantLinear(qw, mod.bias, kernel=kernel))
    log.record(LayerRecord(name, method, None, err, time.perf_counter() - t0, note))


def quantize_layers(model: nn.Module, targets: Dict[str, nn.Linear], cfg: QuantConfig, log: Log, kernel: str) -> None:
    """Every target with ``cfg``'s method, in its format (the GGUF fallback type
    where a k-quant does not fit the rows; the note says so)."""
    options = cfg.method_options()
    for name, mod in targets.items():
        k = mod.weight.shape[1]
        fmt = cfg.format_for(k)
        note = "" if fmt == cfg.format() else f"fallback {fmt.type}: in_features {k} % 256 != 0"
        quantize_layer(model, name, mod, cfg.method, fmt, options, log, kernel, note)
        log.step("layer")
