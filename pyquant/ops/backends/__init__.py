"""Kernels of every backend, registered with ``pyquant.ops.dispatch`` on import.

One module per backend and job: the pure-torch reference (and the
dequantize-then-GEMM path of accelerators), the CPU C++ kernels per format
family and for the solvers, the CUDA C++ kernels, the Triton kernels. Importing
them only registers Python functions: the extension, Triton and the CUDA
runtime load at the first call that needs them.
"""
from . import reference  # noqa: F401
from . import cpu_int, cpu_nf4, cpu_gguf, cpu_solvers  # noqa: F401
from . import cuda, cuda_w8a8, cuda_mma, cuda_mma_sm90, cuda_solvers  # noqa: F401
from . import triton  # noqa: F401
from . import reference_lora, cpu_lora, triton_lora  # noqa: F401  (QLoRA: lora_qmatmul, qmatmul_transposed)
