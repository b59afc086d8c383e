"""Triton kernels of pyquant (installed as ``pyquant.triton_kernels``).

Imported lazily by ``pyquant.ops.backends.triton`` at the first call that wants
Triton, never at ``import pyquant``. Importing this package itself does not
import triton either: the kernel modules load on first use.

    dequantize(qdata, fmt, shape, dtype)            -> (N, K) in dtype, bit-exact
    qmatmul(x2d, qdata, fmt, shape, bias, path=...)  -> (M, N) in x.dtype
    lora_qmatmul(x2d, qdata, fmt, shape, xa, B, s)   -> x @ W_hat.T + s * xa @ B.T (QLoRA forward)
    qmatmul_transposed(g2d, qdata, fmt, shape)       -> g @ W_hat (QLoRA backward, grad_x)
    tune(qw, m_values=..., dtype=...)                -> tuned configs, saved per GPU
    hqq_solve(w, bits, group, ...)                   -> HQQ codes, scales, zeros, err, iters
    gptq_block_update(W, Hinv, scale, zero, ...)     -> GPTQ's in-block update, in place

``path`` forces "gemv" | "splitk" | "gemm" (default: by M, see ``path_for_m``).
On the CPU the kernels run under Triton's interpreter: set TRITON_INTERPRET=1
before the first call (Triton reads it when the kernels are defined).

Layout: ``decode.py`` (in-register decode of every format), ``matmul/`` (the
kernels of each path and their launch code), ``solvers/`` (HQQ, GPTQ),
``tuning/`` (configs, per-GPU cache, autotune), ``tools/`` (``python -m
pyquant.triton_kernels.tools.sass``: sm_90 machine code of the main variants,
no GPU needed; ``python -m pyquant.triton_kernels.tools.bench``: GPU timing
against cuBLAS fp16 on the Llama shapes). Of pyquant, only ``pyquant.formats`` and
``pyquant.errors`` are imported here.
"""
from __future__ import annotations

from .tuning.configs import PATHS, Config, m_bucket, path_for_m  # noqa: F401  (no triton import)


def dequantize(qdata, fmt, shape, dtype, config=None):
    from .matmul.launch import dequantize as _deq

    return _deq(qdata, fmt, tuple(shape), dtype, config=config)


def qmatmul(x, qdata, fmt, shape, bias=None, path=None, config=None):
    from .matmul.launch import qmatmul as _mm

    return _mm(x, qdata, fmt, tuple(shape), bias, path=path, config=config)


def lora_qmatmul(x, qdata, fmt, shape, xa, lora_B, scale, bias=None):
    """QLoRA forward: ``x @ W_hat.T + scale * xa @ lora_B.T (+ bias)``, the low-rank term in the epilogue."""
    from .matmul.launch_lora import lora_qmatmul as _lora

    return _lora(x, qdata, fmt, tuple(shape), xa, lora_B, scale, bias)


def qmatmul_transposed(g, qdata, fmt, shape):
    """QLoRA backward: ``g @ W_hat`` (grad_x), the weight decoded in registers only."""
    from .matmul.launch_lora import qmatmul_transposed as _t

    return _t(g, qdata, fmt, tuple(shape))


def tune(qw, m_values=None, dtype=None, paths=None, save=True, verbose=False):
    """Autotune the kernels for one QuantizedWeight on its (CUDA) device; see ``matmul.tune.tune``."""
    from .matmul.tune import tune as _tune

    return _tune(qw, m_values=m_values, dtype=dtype, paths=paths, save=save, verbose=verbose)


def interpreting() -> bool:
    from .matmul.launch import interpreting as _interp

    return _interp()


def kernels_loaded() -> bool:
    """Have the kernels been defined (compiled for a GPU or interpreted) in this process?
    Triton decides between the two when a kernel is defined, not when it runs."""
    import sys

    return __name__ + ".matmul.dequant" in sys.modules


def hqq_solve(w, bits, group, scale_dtype, lp_norm, kappa_one, early_stop, schedule, tiny):
    """Fused HQQ solve -> (codes, scales, zeros, err, iters); see ``solvers.hqq.hqq_solve``."""
    from .solvers.hqq import hqq_solve as _solve

    return _solve(w, bits, group, scale_dtype, lp_norm, kappa_one, early_stop, schedule, tiny)


def gptq_block_update(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out, block_n=None,
                      num_warps=None):
    """GPTQ's in-block column update, in place; see ``solvers.gptq.gptq_block_update``."""
    from .solvers.gptq import gptq_block_update as _update

    return _update(W, Hinv, scale, zero, start, stop, group_len, maxq, codes_out, err_out, block_n=block_n,
                   num_warps=num_warps)


__all__ = [
    "dequantize", "qmatmul", "lora_qmatmul", "qmatmul_transposed", "tune", "interpreting", "kernels_loaded",
    "hqq_solve", "gptq_block_update",
    "Config", "PATHS", "m_bucket", "path_for_m",
]
