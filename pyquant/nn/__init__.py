from .quant_linear import QuantLinear, replace_linear

__all__ = ["QuantLinear", "replace_linear"]
