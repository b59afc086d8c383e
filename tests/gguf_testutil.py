"""Helpers for tests of the GGUF block formats (reference, kernels, io).

Import as ``from tests.gguf_testutil import ...`` (tests is a package; pytest puts
the repository root on sys.path). gguf-py (``gguf.quants``) is the peer every GGUF result is
checked against.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional

import numpy as np
import torch

from pyquant.formats.gguf import BLOCK_TYPES
from pyquant.formats.gguf_blocks import FP16_FIELDS, K_TYPES, LEGACY_TYPES

ALL_TYPES = tuple(BLOCK_TYPES)
__all__ = [
    "ALL_TYPES", "LEGACY_TYPES", "K_TYPES", "FP16_FIELDS", "ggml_type", "random_blocks", "set_fp16",
    "finite_fp16_bits", "gguf_dequantize_np", "gguf_quantize_np", "assert_bitexact",
]


def ggml_type(type_name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[type_name]


def finite_fp16_bits(bits: torch.Tensor) -> torch.Tensor:
    """Map arbitrary 16-bit patterns (int32 0..65535) to finite fp16 patterns:
    an all-ones exponent (Inf/NaN) loses its top exponent bit, which keeps the
    sign and mantissa and lands on an ordinary value near 1."""
    bits = bits.to(torch.int32) & 0xFFFF
    nonfinite = (bits & 0x7C00) == 0x7C00
    return torch.where(nonfinite, bits & ~0x4000, bits)


def set_fp16(blocks: torch.Tensor, type_name: str, field: int, value) -> torch.Tensor:
    """Write fp16 field number ``field`` (index into FP16_FIELDS[type_name]) of
    every block of ``blocks`` (uint8, ``(nb, type_size)``) in place.
    ``value``: a float, or an int bit pattern, or an int32 tensor ``(nb,)`` of
    bit patterns."""
    off = FP16_FIELDS[type_name][field]
    if isinstance(value, float):
        bits = int(torch.tensor(value, dtype=torch.float16).view(torch.int16)) & 0xFFFF
    else:
        bits = value
    if isinstance(bits, torch.Tensor):
        bits = bits.to(torch.int32) & 0xFFFF
        blocks[:, off] = (bits & 0xFF).to(torch.uint8)
        blocks[:, off + 1] = (bits >> 8).to(torch.uint8)
    else:
        blocks[:, off] = bits & 0xFF
        blocks[:, off + 1] = (bits >> 8) & 0xFF
    return blocks


def random_blocks(
    type_name: str,
    n_blocks: int,
    generator: Optional[torch.Generator] = None,
    *,
    fp16_values: Optional[Iterable[float]] = None,
) -> torch.Tensor:
    """Random VALID blocks of ``type_name``: uint8 ``(n_blocks, type_size)``.

    Code bits are uniformly random; every fp16 field (scale, min) is a random
    finite fp16 (any sign, subnormals included, no Inf/NaN) or, with
    ``fp16_values``, drawn from that list.
    """
    ts = BLOCK_TYPES[type_name].type_size
    blocks = torch.randint(0, 256, (n_blocks, ts), generator=generator, dtype=torch.uint8)
    for i, _ in enumerate(FP16_FIELDS[type_name]):
        if fp16_values is None:
            bits = finite_fp16_bits(torch.randint(0, 1 << 16, (n_blocks,), generator=generator))
        else:
            vals = torch.tensor(list(fp16_values), dtype=torch.float16)
            idx = torch.randint(0, len(vals), (n_blocks,), generator=generator)
            bits = vals[idx].view(torch.int16).to(torch.int32)
        set_fp16(blocks, type_name, i, bits)
    return blocks


def gguf_dequantize_np(type_name: str, blocks: torch.Tensor) -> torch.Tensor:
    """gguf-py's dequantization of uint8 block bytes ``(rows, nb*type_size)``
    -> fp32 ``(rows, nb*block_size)``."""
    from gguf.quants import dequantize

    arr = np.ascontiguousarray(blocks.detach().cpu().numpy())
    return torch.from_numpy(np.array(dequantize(arr, ggml_type(type_name)), dtype=np.float32))


def gguf_quantize_np(type_name: str, w: torch.Tensor) -> torch.Tensor:
    """gguf-py's quantization of fp32 ``w`` ``(N, K)`` -> uint8 block bytes.
    (Its numpy code warns about the casts of tiny-range blocks; silenced.)"""
    from gguf.quants import quantize

    arr = np.ascontiguousarray(w.detach().cpu().to(torch.float32).numpy())
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return torch.from_numpy(np.array(quantize(arr, ggml_type(type_name)), dtype=np.uint8))


def assert_bitexact(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal bit patterns (so -0.0 != 0.0 and NaN payloads count), with the
    first mismatch and the number of mismatches in the message."""
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if actual.dtype.is_floating_point:
        ibits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
        a, e = actual.contiguous().view(ibits), expected.contiguous().view(ibits)
    else:
        a, e = actual, expected
    if torch.equal(a, e):
        return
    bad = (a != e).nonzero()
    first = tuple(bad[0].tolist())
    raise AssertionError(
        f"{what}: {bad.shape[0]} of {a.numel()} elements differ; first at {first}: "
        f"got {actual[first].item()!r}, expected {expected[first].item()!r}"
    )
