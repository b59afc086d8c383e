"""``quantize_weight``: the one-call way from a float weight to a QuantizedWeight."""
from __future__ import annotations

import torch

from .errors import FormatError
from .formats import Format, QuantizedWeight
from .validation import check_finite, check_weight_2d


def quantize_weight(weight: torch.Tensor, fmt: Format, method: str = "rtn") -> QuantizedWeight:
    """Quantize ``weight`` (out_features, in_features) into ``fmt``.

    ``method``: the calibration-free ones, ``"rtn"`` (round to nearest, any
    format) or ``"hqq"`` (asymmetric Int formats; pyquant's default HQQ, see
    ``pyquant.algorithms.hqq``). Calibrated methods (GPTQ, AWQ) go through
    ``pyquant.quantize_model`` or ``pyquant.algorithms``.
    """
    check_weight_2d("weight", weight)
    if not isinstance(fmt, Format):
        raise FormatError(f"fmt must be a pyquant Format (Int, NF4, GGUF), got {type(fmt).__name__}")
    fmt.check_shape(tuple(weight.shape))
    check_finite("weight", weight)
    if method == "hqq":
        from .algorithms.hqq import hqq_quantize

        return hqq_quantize(weight.detach(), fmt)
    if method != "rtn":
        raise FormatError(f"quantize_weight supports method='rtn' or 'hqq', got {method!r}")
    from .algorithms.rtn import rtn

    with torch.no_grad():
        return rtn(weight.detach(), fmt)
