from . import gguf  # noqa: F401  (pyquant.io.gguf.GGUFFile)
