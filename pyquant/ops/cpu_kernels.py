"""Registers the compiled kernels (CPU C++ per format family, and CUDA C++).

Each family's glue lives in its own module (``cpu_int``, ``cpu_nf4``,
``cpu_gguf``); importing them only registers Python functions, the extension
itself is loaded at the first call.
"""
from . import cpu_int  # noqa: F401
from . import cpu_nf4  # noqa: F401
from . import cpu_gguf  # noqa: F401
from . import cuda_kernels  # noqa: F401
from . import triton_backend  # noqa: F401
