"""Files in and out: pyquant checkpoints (``checkpoint``), the GGUF reader (``gguf``), the exchange
with other ecosystems (``exchange``: GPTQ, AWQ, compressed-tensors, HQQ, bitsandbytes, GGUF)."""
from . import checkpoint, exchange, gguf  # noqa: F401
from .exchange import export_model, import_model  # noqa: F401
