"""``quantize_weight``: the one-call way from a float weight to a QuantizedWeight."""
from __future__ import annotations

import torch

from .errors import FormatError
from .formats import Format, QuantizedWeight
from .methods import get_method
from .validation import check_finite, check_weight_2d


def quantize_weight(weight: torch.Tensor, fmt: Format, method: str = "rtn", **options) -> QuantizedWeight:
    """Quantize ``weight`` (out_features, in_features) into ``fmt``.

    ``method``: a calibration-free method of ``pyquant.methods.METHODS``:
    ``"rtn"`` (round to nearest, any format), ``"hqq"`` (asymmetric Int
    formats; pyquant's default HQQ, see ``pyquant.algorithms.hqq``),
    ``"nf4"`` (round to nearest into NF4) or a GGUF type (``"q4_0"``,
    ``"q4_k"``...: round to nearest into that type or its llama.cpp fallback).
    Calibrated methods (GPTQ, AWQ) go through ``pyquant.quantize_model`` or
    ``pyquant.algorithms``.

    ``options``: keyword options of the method, as ``QuantConfig.method_kwargs``;
    HQQ takes ``zero_point`` ("anchored", "integer", "float"), ``iters``,
    ``lp_norm``, ``beta``, ``kappa``, ``early_stop`` and ``kernel``, e.g.
    ``quantize_weight(W, fmt, method="hqq", zero_point="float")``. An option the
    method does not take is a FormatError naming it.
    """
    check_weight_2d("weight", weight)
    if not isinstance(fmt, Format):
        raise FormatError(f"fmt must be a pyquant Format (Int, NF4, GGUF), got {type(fmt).__name__}")
    m = get_method(method)
    if m.needs_calibration:
        raise FormatError(
            f"quantize_weight: method {m.name!r} needs calibration data; use pyquant.quantize_model, "
            f"or pyquant.algorithms.{m.name} with the layer's input statistics"
        )
    m.check_options(options)
    m.check_format(fmt)
    fmt.check_shape(tuple(weight.shape))
    check_finite("weight", weight)
    with torch.no_grad():
        return m.quantize(weight.detach(), fmt, **options)
