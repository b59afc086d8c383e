"""Which activations the CPU qmatmul kernels multiply with: int8 or exact fp32.

* ``"int8"``: x is quantized once per call, per 32-block, to int8 (for the
  GGUF k-quants per 256-block, as ggml's Q8_K), and the kernels take integer
  dot products against the weight's integer codes (``vpmaddubsw`` /
  ``vpdpbusd``), applying the float scales per block. For the GGUF types this
  is exactly llama.cpp's arithmetic (the same x blocks, the same integer dot
  products). Measured on SmolLM2-135M's weights and activations the output
  differs from the exact product by ~0.5% (relative L2, Int4 / NF4;
  ``benchmarks/cpu_int8_error.py``): bf16-level, several times faster at
  small M.
* ``"fp32"``: exact, ``x @ W_hat.T`` to fp32 rounding.
* ``"auto"`` (the default): GGUF weights take ``"int8"`` (their producers,
  llama.cpp, define them that way); Int and NF4 weights ``"fp32"``: the rest of
  pyquant (AWQ folds, GPTQ/AWQ pipelines, QLoRA training, evaluation) is built
  on qmatmul being ``x @ W_hat.T`` to fp32 rounding, and the int8 path is one
  setting away where its speed matters more.

Choose with the environment variable ``PYQUANT_CPU_ACTIVATIONS`` (read at
each call) or, for a block of code (this thread / task only)::

    with cpu_activations("int8"):
        y = pyquant.qmatmul(x, qw)
"""
from __future__ import annotations

import contextlib
import contextvars
import os

from ...errors import ValueRangeError

ENV = "PYQUANT_CPU_ACTIVATIONS"
MODES = ("auto", "int8", "fp32")

_override: contextvars.ContextVar = contextvars.ContextVar("pyquant_cpu_activations", default=None)


def _check(mode, where: str) -> str:
    if mode not in MODES:
        raise ValueRangeError(f"{where} must be one of {MODES}, got {mode!r}")
    return mode


def current() -> str:
    """The mode in effect: the innermost ``cpu_activations`` block, else the
    environment variable, else ``"auto"``."""
    mode = _override.get()
    if mode is not None:
        return mode
    env = os.environ.get(ENV)
    return "auto" if not env else _check(env, f"environment variable {ENV}")


@contextlib.contextmanager
def cpu_activations(mode: str):
    """Run the block with the CPU qmatmul kernels in ``mode`` ("auto", "int8", "fp32")."""
    token = _override.set(_check(mode, "cpu_activations mode"))
    try:
        yield
    finally:
        _override.reset(token)


def use_int8(family: str) -> bool:
    """Whether a qmatmul on a weight of this format family ("gguf", "int",
    "nf4") takes the int8-activation kernels now."""
    mode = current()
    if mode == "auto":
        return family == "gguf"
    return mode == "int8"
