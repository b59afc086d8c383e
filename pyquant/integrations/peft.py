"""pyquant's QuantLinear as a peft LoRA target, through pyquant's fused kernels.

    import pyquant.integrations.peft  # registers QuantLoraLinear with peft
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))

peft lets third-party layers take LoRA through its custom-module mechanism
(``LoraConfig._register_custom_module({QuantLinear: QuantLoraLinear})``). That
is per config, so importing this module hooks peft's module factory
(``LoraModel._create_new_module``) to register ours on any config that meets a
QuantLinear: every ``get_peft_model`` after the import uses it, whatever config
it gets. :func:`register` does it for one config explicitly.

:class:`QuantLoraLinear` follows peft's conventions (``lora_A``/``lora_B``
ModuleDicts of ``nn.Linear`` per adapter, ``scaling``, ``lora_dropout``), so
``save_pretrained`` writes a normal adapter that loads onto the float model as
well; its forward runs the first active adapter through
``torch.ops.pyquant.lora_qmatmul`` (the fused forward and backward of
``pyquant.nn.lora``). The packed weights are buffers: peft's
``prepare_model_for_kbit_training`` (which casts and freezes parameters)
leaves them alone.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from peft.tuners.lora import LoraConfig, LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..errors import FormatError
from ..nn.lora import lora_linear
from ..nn.quant_linear import QuantLinear


class QuantLoraLinear(nn.Module, LoraLayer):
    """peft's LoRA layer around a frozen :class:`~pyquant.QuantLinear`."""

    def __init__(self, base_layer: QuantLinear, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.out_features

    def _active(self):
        return [a for a in self.active_adapters if a in self.lora_A]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise FormatError("pyquant QuantLoraLinear does not take mixed adapter batches (adapter_names=)")
        kwargs.pop("adapter_names", None)
        active = self._active()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        first, *rest = active
        y = self._adapter_forward(x, first, fused=True)
        for name in rest:  # further active adapters: torch's ops on the same input
            y = y + self._adapter_forward(x, name, fused=False).to(y.dtype)
        return y

    def _adapter_forward(self, x: torch.Tensor, name: str, fused: bool) -> torch.Tensor:
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        if not fused:  # peft's own formula (lora_B's bias, with lora_bias, is inside lora_B(...))
            return lora_B(lora_A(dropout(x.to(lora_A.weight.dtype)))) * scaling
        drop = dropout if isinstance(dropout, nn.Dropout) else None
        y = lora_linear(x, self.base_layer, lora_A.weight, lora_B.weight, scaling, drop)
        if lora_B.bias is not None:  # peft's lora_bias: scaled with the rest of the adapter's output
            y = y + scaling * lora_B.bias.to(y.dtype)
        return y

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    @torch.no_grad()
    def _requantize(self, delta: torch.Tensor) -> None:
        from ..quantize import quantize_weight

        base: QuantLinear = self.base_layer
        w = base.dequantized_weight(torch.float32) + delta.float()
        self.base_layer = QuantLinear(quantize_weight(w, base.qformat), base.bias, kernel=base.kernel)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        """Merge adapters into the packed weight: dequantize, add, requantize
        (round to nearest in the same format), as peft does for bitsandbytes."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            delta = self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(delta).all():
                raise FormatError(f"NaNs or Infs in the merged weights: adapter {name!r} seems to be broken")
            self._requantize(delta)
            if self.lora_bias[name]:
                self.base_layer.bias.data += self.lora_B[name].bias * self.scaling[name]
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            self._requantize(-self.get_delta_weight(name))
            if self.lora_bias[name]:
                self.base_layer.bias.data -= self.lora_B[name].bias * self.scaling[name]

    def __repr__(self) -> str:
        return "pyquant.lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """Register QuantLoraLinear for QuantLinear on ``config`` (peft's custom-module API)."""
    custom = getattr(config, "_custom_modules", None) or {}
    if QuantLinear not in custom:
        config._register_custom_module({QuantLinear: QuantLoraLinear})
    return config


def _install() -> None:
    original = LoraModel._create_new_module
    if getattr(original, "_pyquant_hook", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, QuantLinear) and isinstance(lora_config, LoraConfig):
            register(lora_config)
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._pyquant_hook = True
    LoraModel._create_new_module = staticmethod(_create_new_module)


_install()
