"""pyquant: quantization kernels and drop-in modules for PyTorch.

    import pyquant
    from pyquant.formats import Int
    qw = pyquant.quantize_weight(W, Int(bits=4, group_size=128))
    y = pyquant.qmatmul(x, qw)

Importing pyquant compiles nothing, tunes nothing and needs neither a GPU,
Triton nor the compiled extension.
"""
from ._version import __version__
from . import formats, ops
from .env import env
from .errors import (
    DeviceError,
    DtypeError,
    FormatError,
    KernelUnavailableError,
    PyquantError,
    ShapeError,
    ValueRangeError,
)
from .formats import GGUF, NF4, Format, Int, QuantizedWeight
from .ops import dequantize, pack, qmatmul, unpack
from .quantize import quantize_weight
from . import nn
from .nn import LoRALinear, QuantLinear, add_lora, load_adapters, merge_lora, replace_linear, save_adapters
from . import io
from .io.checkpoint import load_quantized, save_quantized
from .io.exchange import export_model, import_model
from .config import QuantConfig
from .pipeline import quantize_model
from .integrations import hf_hook as _hf_hook

# transformers' from_pretrained/save_pretrained learn pyquant checkpoints once transformers
# loads its models (never imported from here: see pyquant/integrations/hf_hook.py).
_hf_hook.install()


__all__ = [
    "formats", "ops", "nn", "io", "env",
    "Format", "Int", "NF4", "GGUF", "QuantizedWeight",
    "quantize_weight", "dequantize", "qmatmul", "pack", "unpack",
    "QuantLinear", "replace_linear",
    "LoRALinear", "add_lora", "merge_lora", "save_adapters", "load_adapters",
    "PyquantError", "ShapeError", "DtypeError", "DeviceError", "FormatError", "ValueRangeError",
    "KernelUnavailableError",
    "QuantConfig", "quantize_model", "save_quantized", "load_quantized", "export_model", "import_model",
]
