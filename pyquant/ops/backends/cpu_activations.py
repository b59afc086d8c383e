"""Which activations the CPU qmatmul kernels multiply with: int8 or exact fp32.

* ``"int8"``: x is quantized once per call, per 32-block, to int8, and the
  kernels take integer dot products against the weight's integer codes
  (``vpmaddubsw`` / ``vpdpbusd``), applying the float scales per block (for
  Int weights at g64 / g128 / g256 one scale per group: its dot products are
  added as integers before any float work: Int4 g128 1.04-1.14x faster at M =
  1 on Zen 3, Int2 / Int3 / Int8 g128 1.25-1.47x at the avx512 level on Zen 5).
  GGUF: exactly llama.cpp's arithmetic (x as ggml's Q8_0 / Q8_1 / Q8_K blocks,
  the same integer dot products). Int and NF4: x in two int8 planes (x ~ d (q
  + q2 / 256); NF4's codebook likewise) -- one plane, as llama.cpp's, measured
  up to 3% off the exact product on SmolLM2-135M layers with outlier
  activations; two planes at most 3.4e-4 (relative L2 per layer over every
  linear layer, ``benchmarks/cpu_int8_error.py``): below what rounding x to
  bf16 costs (2.5e-3). 2-4x faster than the fp32 kernels at small M.
* ``"fp32"``: exact, ``x @ W_hat.T`` to fp32 rounding.
* ``"auto"`` (the default): GGUF weights take ``"int8"`` (their producer,
  llama.cpp, defines them that way). Int and NF4 weights take ``"int8"`` when
  x is fp16 / bf16 -- its error is below the rounding of x and of the output
  in that dtype -- and ``"fp32"`` when x is fp32: the rest of pyquant (AWQ
  folds, GPTQ/AWQ pipelines, QLoRA training, evaluation) and its callers rely
  on an fp32 qmatmul being ``x @ W_hat.T`` to fp32 rounding. At the avx512
  level fp16 / bf16 x too takes ``"fp32"`` from ``EXACT_FROM_M`` rows on:
  there the exact kernels' outer-product tile is the faster one (4096 x 4096,
  2 threads, Int4: 4.5 ms against 5.3 at M = 48, 41 against 56 at M = 512;
  NF4 5.1 against 6.4 and 43 against 82), and exact costs nothing in
  accuracy. NF4 takes ``"fp32"`` there at every M (``EXACT_FROM_M_AVX512``):
  its exact kernel at that level looks codes up with one vpermps per 16
  values (csrc/cpu/nf4_matmul.cpp), as fast as the int8 planes (4096 x 4096,
  Zen 5, 1 and 2 threads, cold and warm: the exact kernel's time over the
  planes' 0.88-0.91 at M = 1, 0.87-0.94 at 8 and 16, 0.91-1.11 at 2 and 4).
  Int4 with bf16 x takes ``"fp32"`` at every M where the CPU has AVX512-BF16:
  up to 64 rows its exact path there multiplies bf16 x with the codes by
  ``vdpbf16ps`` (exact products, fp32 sums; csrc/cpu/int4_bf16.cpp),
  the fastest of the three (4096 x 4096, 2 threads, cold: 0.67 ms at M = 8
  against 0.95 for the int8 planes and 0.84 for torch's int4 kernel).
  At the avx2 level (vpmaddubsw, no VNNI) the exact kernels take fp16 / bf16
  x from ``EXACT_FROM_M_AVX2`` rows on: once a few rows share the exact
  kernels' weight decode, their FMAs outrun the two int8 planes' integer
  dot products and per-block float epilogue. Measured on an AMD EPYC (Zen 3,
  AVX2 only), 4096 x 4096, bf16 and fp16 x, cold, 1 and 2 threads: the
  exact kernels' time over the int8 planes' at M = 8 is 0.50 (Int8), 0.53
  (Int2), 0.68 (Int3), 0.69 (Int4), 0.71 (NF4); Int2 is ahead exactly from
  M = 2 (0.80-0.94), Int8 from M = 3 (0.75-0.95). For Int3 and Int4 the
  int8 planes' speed relative to the exact kernels is 0.94-1.06 at M = 4
  and 0.99-1.20 at M = 6 (the exact kernels' second pass half full). NF4's
  exact kernels decode 32 codebook values per 12 byte shuffles at small M
  (csrc/cpu/nf4_matmul.cpp): bf16 x, cold, their time over the int8 planes'
  was 1.03-1.16 at M = 1 and 0.85-0.93 at M = 2 (0.67-0.81 at M = 3-6).
  At the avxvnni level (vpdpbusd on 256 bits, no AVX-512) the int8 planes
  hold on longer, and the exact kernels take fp16 / bf16 x from
  ``EXACT_FROM_M_AVXVNNI`` rows on. Measured on a Zen 5 EPYC forced to that
  level (``PYQUANT_SIMD=avxvnni``; no Intel CPU with AVX-VNNI but no AVX-512
  was at hand), 4096 x 4096, cold, 1 and 2 threads, the exact kernels' time
  over the int8 planes': at M = 8 1.09-1.10 (Int2), 1.20 (Int3), 1.18-1.23
  (Int8), 1.11 (NF4); at M = 16 0.95-0.96, 0.88-0.90, 1.04-1.06, 0.87-0.96;
  at M = 32 Int8 0.91-0.94. Int4's int8 planes stayed ahead at every M
  measured (1.05-1.09 at M = 64-256).

Choose with the environment variable ``PYQUANT_CPU_ACTIVATIONS`` (read at
each call) or, for a block of code (this thread / task only)::

    with cpu_activations("int8"):
        y = pyquant.qmatmul(x, qw)
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from ... import _ext
from ...errors import ValueRangeError
from .._dtypes import dtype_code

ENV = "PYQUANT_CPU_ACTIVATIONS"
MODES = ("auto", "int8", "fp32")
# From this many rows of x on, "auto" multiplies fp16 / bf16 x exactly where
# the avx512 tiles run (measured: the two paths tie at M = 32 on 4096 x 4096,
# exact leads from 48).
EXACT_FROM_M = 48
# Where that is another number at the avx512 level, by family and bit width.
EXACT_FROM_M_AVX512 = {("nf4", 0): 1}
# The same at the avx2 level, by family and bit width (see the module doc).
EXACT_FROM_M_AVX2 = {("int", 2): 2, ("int", 3): 8, ("int", 4): 8, ("int", 8): 3, ("nf4", 0): 2}
# And at the avxvnni level (Int4: the int8 planes at every M).
EXACT_FROM_M_AVXVNNI = {("int", 2): 16, ("int", 3): 16, ("int", 8): 32, ("nf4", 0): 16}

_override: contextvars.ContextVar = contextvars.ContextVar("pyquant_cpu_activations", default=None)


def _env_reader():
    """A function returning ENV's value now (None when unset). ``os.environ.get``
    takes ~0.55 us for an unset name (its miss goes through a raised KeyError),
    a twentieth of a 576-wide CPU product at M = 1; the dict behind
    ``os.environ`` (the one its item assignment, ``del`` and pytest's
    ``monkeypatch.setenv`` update) answers in ~0.05 us."""
    data, encode, decode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None), \
        getattr(os.environ, "decodevalue", None)
    if not isinstance(data, dict) or encode is None or decode is None:  # not CPython's os.environ
        return lambda: os.environ.get(ENV)
    key = encode(ENV)

    def read():
        value = data.get(key)
        return None if value is None else decode(value)

    return read


_read_env = _env_reader()


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
    env = _read_env()
    return "auto" if not env else _check(env, f"environment variable {ENV}")


@contextlib.contextmanager
def cpu_activations(mode: str):
    """Run the block with the CPU qmatmul kernels in ``mode`` ("auto", "int8", "fp32")."""
    token = _override.set(_check(mode, "cpu_activations mode"))
    try:
        yield
    finally:
        _override.reset(token)


def bf16_dot_kernel(x_dtype: torch.dtype, m: int, bits: int) -> bool:
    """Whether the exact Int kernels take the AVX512-BF16 kernel for this x
    (csrc/cpu/int4_bf16.cpp: 4 bits, bf16 x, small M, a CPU with vdpbf16ps)."""
    ext = _ext.load()
    return ext is not None and x_dtype == torch.bfloat16 and ext.int_bf16_kernel(dtype_code(x_dtype), m, bits)


def simd_level():
    """The level the C++ kernels run at now (None without the extension)."""
    ext = _ext.load()
    return ext.simd_level() if ext is not None else None


def use_int8(family: str, x_dtype: torch.dtype, m: int = 0, bits: int = 0) -> bool:
    """Whether a qmatmul of x (m rows in x_dtype) with a weight of this format
    family ("gguf", "int", "nf4"; ``bits`` for "int") takes the int8-activation
    kernels now."""
    mode = current()
    if mode != "auto":
        return mode == "int8"
    if family == "gguf":
        return True
    if x_dtype not in (torch.float16, torch.bfloat16):
        return False
    if family == "int" and bf16_dot_kernel(x_dtype, m, bits):
        return False
    level = simd_level()
    key = (family, bits if family == "int" else 0)
    if level == "avx512":
        return m < EXACT_FROM_M_AVX512.get(key, EXACT_FROM_M)
    if level == "avx2":
        return m < EXACT_FROM_M_AVX2.get(key, EXACT_FROM_M)
    if level == "avxvnni" and key in EXACT_FROM_M_AVXVNNI:
        return m < EXACT_FROM_M_AVXVNNI[key]
    return True
