"""The passes of ``quantize_model``: one module per kind of method.

``plain``: the calibration-free methods (RTN, HQQ, NF4, GGUF types), layer by
layer. ``gptq`` and ``awq``: calibrated, block by block; each gets a
:class:`BlockContext` per decoder block and replaces that block's selected
linear layers. ``pyquant.methods.METHODS`` says which pass runs a method.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Dict, List, Optional

import torch
from torch import nn

from ...config import QuantConfig
from ...errors import ValueRangeError
from ...formats import Format
from ..arch import Adapter
from ..capture import set_module
from ..report import LayerRecord, Log


@dataclasses.dataclass
class BlockContext:
    """One decoder block, as a calibrated pass sees it."""

    block: nn.Module
    prefix: str  # the block's name in the model, e.g. "model.layers.3"
    groups: List[List[str]]  # block-relative names of linears sharing one input, in execution order
    producers: Dict[str, Optional[str]]  # first layer of a group -> module whose output is its input
    linears: Dict[str, nn.Linear]  # the block's float linear layers by name
    selected: List[str]  # those the filter picked
    inps: List[torch.Tensor]  # the block's calibration inputs, one per batch
    kws: List[dict]  # and the keyword arguments of its forward
    cfg: QuantConfig
    fmt: Format
    log: Log
    kernel: str  # forwarded to the QuantLinear modules
    adapter: Optional[Adapter]  # the model family's fold rules (None: unknown family)
    family: str

    def full(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def replace(self, name: str, new: nn.Module) -> None:
        set_module(self.block, name, new)

    def record(self, rec: LayerRecord) -> None:
        self.log.record(rec)


def load(block_pass: str):
    """The pass module named by a method's ``block_pass``."""
    return importlib.import_module(f"{__name__}.{block_pass}")


def rel_error(w: torch.Tensor, dq: torch.Tensor, H: Optional[torch.Tensor]) -> float:
    """``||dW||^2 / ||W||^2``, or with input statistics ``tr(dW H dW^T) / tr(W H W^T)``."""
    w = w.float()
    d = dq.float() - w
    if H is None:
        den = float((w * w).sum())
        return float((d * d).sum()) / den if den > 0 else 0.0
    den = float(((w @ H) * w).sum())
    return float(((d @ H) * d).sum()) / den if den > 0 else 0.0


def layer_error(name: str, weight: torch.Tensor, exc: Exception) -> Exception:
    """``exc`` re-raised with the layer's name and shape in front of its message."""
    return type(exc)(f"layer {name!r} (weight {tuple(weight.shape)}): {exc}")


def check_weight(name: str, w: torch.Tensor) -> None:
    if not bool(torch.isfinite(w).all()):
        raise ValueRangeError(f"layer {name!r}: weight contains NaN or Inf")
