from .lora import LoRALinear, add_lora, load_adapters, merge_lora, save_adapters
from .quant_linear import QuantLinear, replace_linear

__all__ = ["QuantLinear", "replace_linear", "LoRALinear", "add_lora", "merge_lora", "save_adapters", "load_adapters"]
