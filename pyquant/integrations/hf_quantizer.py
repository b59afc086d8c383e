"""pyquant as a transformers quantization method ("pyquant").

    import pyquant
    model = AutoModelForCausalLM.from_pretrained("out")   # QuantLinear layers, packed tensors
    model.save_pretrained("again")                        # the same layout

``PyquantHfQuantizer`` reads pre-quantized pyquant checkpoints only (quantize
with ``pyquant.quantize_model`` or ``pyquant quantize``). Before transformers
loads a tensor it checks the whole checkpoint (``pyquant.io.checkpoint``) and
swaps each quantized ``nn.Linear`` of the meta-device skeleton for a meta
``QuantLinear`` of the checkpoint's format; transformers then fills its
buffers straight from the files, in the dtypes the format prescribes.

``save_pretrained`` of a model holding QuantLinear layers (however they got
there) attaches this quantizer first, so the written ``config.json`` always
carries the ``quantization_config`` that lets ``from_pretrained`` rebuild it:
without one, transformers would build a dense model with random weights.

Written for the HfQuantizer API of transformers 5 (``checkpoint_files``
passed to ``_process_model_before_weight_loading``).
"""
from __future__ import annotations

import functools
import os

from transformers import modeling_utils
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import FormatError
from ..io import checkpoint
from ..nn import QuantLinear

__all__ = ["PyquantConfig", "PyquantHfQuantizer", "register", "attach_quantizer"]


class PyquantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a pyquant checkpoint (keys: ``pyquant.io.checkpoint``)."""

    def __init__(self, format=None, method=None, layers=None, format_version=checkpoint.FORMAT_VERSION,
                 pyquant_version=None, **kwargs):
        kwargs.pop("quant_method", None)
        self.quant_method = checkpoint.QUANT_METHOD
        self.format_version = format_version
        self.format = format
        self.method = method
        self.layers = dict(layers or {})
        self.pyquant_version = pyquant_version
        for key, value in kwargs.items():  # written by a newer pyquant: kept so a save writes it back
            setattr(self, key, value)


class PyquantHfQuantizer(HfQuantizer):
    requires_calibration = True  # pre-quantized checkpoints only
    quantization_config: PyquantConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise FormatError("pyquant's HfQuantizer needs the checkpoint files from from_pretrained "
                              "(transformers >= 5); use pyquant.load_quantized")
        files = [os.fspath(f) for f in checkpoint_files]
        where = os.path.join(os.path.dirname(files[0]), "config.json")
        plan = checkpoint.plan_from_files(files, self.quantization_config.to_dict(), where)
        # Every float tensor too, unless transformers renames this family's checkpoint keys on load
        # (then it checks them itself; the quantized layers are always checked here).
        checkpoint.check_model(plan, model, strict=not get_model_conversion_mapping(model, add_legacy=False))
        # Checked: only now does the skeleton change.
        for name, lp in plan.layers.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lp.module("meta"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        left = [f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QuantLinear)
                for b, t in m.named_buffers(recurse=False) if t.device.type == "meta"]
        if left:
            raise FormatError(f"{model.config.name_or_path}: no tensor loaded for {left[:8]}")
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def attach_quantizer(model) -> None:
    """Make a transformers model whose QuantLinear layers were put in by pyquant save (and
    report itself) as a pyquant-quantized model. No-op without QuantLinear layers."""
    if getattr(model, "hf_quantizer", None) is not None:
        return
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        return
    known = getattr(model.config, "quantization_config", None)
    known = known.to_dict() if isinstance(known, QuantizationConfigMixin) else known
    method = known.get("method") if isinstance(known, dict) and known.get("quant_method") == "pyquant" else None
    config = PyquantConfig.from_dict(checkpoint.quantization_config_for(model, method))
    model.config.quantization_config = config
    model.hf_quantizer = PyquantHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = checkpoint.QUANT_METHOD


def register() -> None:
    """Register the config, the quantizer and the save hook (idempotent)."""
    if checkpoint.QUANT_METHOD not in hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        hf_auto.register_quantization_config(checkpoint.QUANT_METHOD)(PyquantConfig)
    if checkpoint.QUANT_METHOD not in hf_auto.AUTO_QUANTIZER_MAPPING:
        hf_auto.register_quantizer(checkpoint.QUANT_METHOD)(PyquantHfQuantizer)
    cls = modeling_utils.PreTrainedModel
    if not getattr(cls.save_pretrained, "_pyquant_attaches", False):
        cls.save_pretrained = _attaching(cls.save_pretrained)


def _attaching(save_pretrained):
    @functools.wraps(save_pretrained)
    def wrapper(self, *args, **kwargs):
        attach_quantizer(self)
        return save_pretrained(self, *args, **kwargs)

    wrapper._pyquant_attaches = True
    return wrapper
