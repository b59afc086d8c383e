"""``QuantLinear``: a drop-in ``nn.Linear`` whose weight is a QuantizedWeight."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..errors import FormatError, ShapeError
from ..formats import Format, QuantizedWeight
from ..ops.api import linear
from ..ops.plans import PlanCache


class QuantLinear(nn.Module):
    """``y = x @ W_hat.T + bias`` with ``W_hat`` stored packed.

    The packed tensors are integer/float *buffers* named as in the format
    (``qweight``, ``scales``...), plus ``format`` (the spec string as uint8) and
    ``shape``: ``.to()``, ``state_dict()``, ``load_state_dict()`` and
    ``copy.deepcopy`` work as for any module, and a state dict is made of plain
    tensors. ``module.to(dtype)`` changes the bias and the compute dtype only;
    packed buffers keep the dtypes their format prescribes.
    """

    def __init__(self, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None, kernel: str = "auto"):
        super().__init__()
        if not isinstance(qweight, QuantizedWeight):
            raise FormatError(f"QuantLinear needs a QuantizedWeight, got {type(qweight).__name__}")
        self.out_features, self.in_features = qweight.shape
        self._shape = (self.out_features, self.in_features)  # fixed for the module's life (loads check it)
        self.kernel = kernel
        self._set_qweight(qweight)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ShapeError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    # --- construction -------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt_or_qweight: Union[Format, QuantizedWeight], kernel: str = "auto"):
        """Quantize ``linear.weight`` with RTN into ``fmt`` (or take a ready QuantizedWeight)."""
        if not isinstance(linear, nn.Linear):
            raise FormatError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        if isinstance(fmt_or_qweight, QuantizedWeight):
            qw = fmt_or_qweight
            if qw.shape != tuple(linear.weight.shape):
                raise ShapeError(f"QuantizedWeight shape {qw.shape} != linear weight shape {tuple(linear.weight.shape)}")
        else:
            from ..quantize import quantize_weight

            qw = quantize_weight(linear.weight.detach(), fmt_or_qweight)
        qw = qw.to(linear.weight.device)
        mod = cls(qw, linear.bias, kernel=kernel)
        return mod

    def _set_qweight(self, qw: QuantizedWeight) -> None:
        for name in list(getattr(self, "_packed_names", ())):
            del self._buffers[name]
        self._packed_names = tuple(qw.format.tensor_specs(qw.shape))
        self._spec = qw.format.spec()
        self._format = qw.format
        for name, t in qw.tensors.items():
            self.register_buffer(name, t)
        device = qw.device
        self.register_buffer("format", torch.tensor(list(self._spec.encode()), dtype=torch.uint8, device=device))
        self.register_buffer("shape", torch.tensor(qw.shape, dtype=torch.int64, device=device))

    # --- views --------------------------------------------------------------
    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self._format, {n: getattr(self, n) for n in self._packed_names}, (self.out_features, self.in_features))

    @property
    def qformat(self) -> Format:
        return self._format

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight.dequantize(dtype)

    # --- nn.Module plumbing -------------------------------------------------
    def _apply(self, fn, recurse=True):
        # Keep packed dtypes fixed: module.half() must not turn fp32 NF4 absmax
        # or int codes into something the kernels cannot read.
        before = {n: self._buffers[n] for n in self._packed_names}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A checkpoint may hold another format/shape than this module was built
        # with (e.g. loading GPTQ results into an RTN skeleton): rebuild from it.
        if prefix + "format" in state_dict:
            qw = QuantizedWeight.from_state_dict(state_dict, prefix)
            if qw.shape != (self.out_features, self.in_features):
                error_msgs.append(
                    f"{prefix}: checkpoint weight shape {qw.shape} != module shape {(self.out_features, self.in_features)}"
                )
                return
            self._set_qweight(qw.to(self.shape.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x's checks (a float tensor, last dim in_features, the weight's device) are linear's
        if torch._C._is_any_autocast_enabled() and isinstance(x, torch.Tensor) and torch.is_autocast_enabled(
                x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        plans = self.__dict__.get("_plans")  # launch plans of the eager path (ops/plans.py)
        if plans is None:
            plans = self.__dict__["_plans"] = PlanCache()
        buffers = self._buffers  # dict lookups: nn.Module.__getattr__ costs ~1 us per name
        return linear(x, [buffers[n] for n in self._packed_names], self._format, self._shape,
                      self._parameters["bias"], self.kernel, plans)

    def extra_repr(self) -> str:
        bpw = self.quantized_weight.bits_per_weight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self._format.describe()}, {bpw:.3f} bits/weight"
        )


def default_filter(name: str, module: nn.Module, model: nn.Module) -> bool:
    """Every nn.Linear except the output head (tied to the embeddings in many LMs)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and module is head:
        return False
    return name.split(".")[-1] not in ("lm_head", "output", "embed_out")


def replace_linear(model: nn.Module, fmt: Format, filter=None, kernel: str = "auto") -> nn.Module:
    """Replace, in place, the ``nn.Linear`` layers that ``filter(name, module)``
    selects by RTN-quantized ``QuantLinear`` modules. Returns ``model``."""
    if not isinstance(fmt, Format):
        raise FormatError(f"fmt must be a pyquant Format, got {type(fmt).__name__}")
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
        and (default_filter(name, mod, model) if filter is None else filter(name, mod))
    ]
    if not targets:
        raise ValueError("replace_linear: the filter matched no nn.Linear layer in the model")
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            new = QuantLinear.from_linear(mod, fmt, kernel=kernel)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {name!r} (weight {tuple(mod.weight.shape)}): {exc}") from exc
        setattr(parent, child, new)
    return model
