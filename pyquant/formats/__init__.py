"""Storage formats: the only place that knows how bits are arranged."""
from .base import Format, QuantizedWeight, format_from_spec, validate_packed
from .gguf import GGUF, BLOCK_TYPES
from .int_format import Int
from .int_mma import IntMMA, from_mma, to_mma
from .nf4 import NF4

__all__ = ["Format", "QuantizedWeight", "format_from_spec", "validate_packed", "Int", "IntMMA", "to_mma", "from_mma", "NF4", "GGUF", "BLOCK_TYPES"]
