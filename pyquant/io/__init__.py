"""Files in and out: pyquant checkpoints (``checkpoint``), the GGUF reader (``gguf``), peer converters."""
from . import checkpoint, gguf  # noqa: F401  (pyquant.io.checkpoint.save_quantized, pyquant.io.gguf.GGUFFile)
