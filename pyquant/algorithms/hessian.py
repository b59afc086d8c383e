"""Second-moment statistics of a linear layer's inputs (GPTQ's Hessian, AWQ's
activation statistics).

For inputs ``X`` (n tokens x K) the layer-wise reconstruction loss
``||X W^T - X W_hat^T||^2`` has Hessian ``H = 2/n * X^T X`` (w.r.t. each
row of W). The accumulator keeps ``X^T X`` in fp32 (one ``addmm`` per batch,
whatever the activation dtype) and the per-channel sum of ``|x|`` that AWQ
needs, so both methods share one pass over the calibration data.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ShapeError, ValueRangeError


class HessianAccumulator:
    def __init__(self, in_features: int, device=None, name: str = "layer", abs_mean: bool = False):
        self.in_features = in_features
        self.name = name
        self.gram = torch.zeros((in_features, in_features), dtype=torch.float32, device=device)
        self.abs_sum = torch.zeros(in_features, dtype=torch.float32, device=device) if abs_mean else None
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"{self.name}: input last dim {x.shape[-1]} != in_features={self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(device=self.gram.device, dtype=torch.float32)
        if x.shape[0] == 0:
            return
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(-1).sum())
            raise ValueRangeError(
                f"calibration activations entering {self.name} contain NaN/Inf ({bad} of {x.shape[0]} tokens); "
                "the float model already overflows on this calibration data (check its dtype and the token ids)"
            )
        self.gram.addmm_(x.T, x)
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2/n X^T X`` (a new tensor); zeros when nothing was seen."""
        if self.n_tokens == 0:
            return torch.zeros_like(self.gram)
        return self.gram * (2.0 / self.n_tokens)

    def abs_mean(self) -> Optional[torch.Tensor]:
        if self.abs_sum is None:
            return None
        return self.abs_sum / max(self.n_tokens, 1)
