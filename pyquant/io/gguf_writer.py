"""Writing GGUF files (version 3, little-endian): metadata plus dense and block-quantized tensors.

    write_gguf("model.gguf", {"general.architecture": "llama", ...},
               {"blk.0.attn_q.weight": quantized_weight, "output_norm.weight": fp32_tensor})

The layout is the one :mod:`pyquant.io.gguf` reads (and gguf-py, llama.cpp):
magic, version, tensor count, metadata count, the metadata key/value records,
the tensor infos (name, dims with ``ne[0]`` the contiguous one, ggml type,
offset relative to the data section), padding to ``general.alignment`` (32
unless given), then each tensor's bytes, each starting on an aligned offset.
Tensor bytes are written as they are held, so a file read with gguf-py gives
back exactly the bytes of every QuantizedWeight (a GGUF format's ``blocks``)
and every dense tensor.

Metadata values take their GGUF type from ``types`` (the ``metadata_types``
of :class:`pyquant.io.gguf.GGUFFile`, so a file read and written again keeps
its types), otherwise from the Python value: bool -> BOOL, int -> UINT32
(INT32 when negative, UINT64 / INT64 when wider), float -> FLOAT32, str ->
STRING, a list -> ARRAY of its elements' type.
"""
from __future__ import annotations

import os
import struct
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from ..errors import FormatError
from ..formats import GGUF, QuantizedWeight
from ..formats.gguf import BLOCK_TYPES
from .gguf import _SCALARS, DEFAULT_ALIGNMENT, GGML_TYPES, MAGIC, MAX_DIMS, ValueType
from .files import atomic_output

VERSION = 3
_DENSE_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}
_TYPE_ID = {t.name: i for i, t in GGML_TYPES.items()}
# value type id -> (struct code, numpy dtype): the reader's table, so both sides agree.
_SCALAR_CODES = {t: code for t, (code, _) in _SCALARS.items()}


def _infer_type(value, key: str):
    if isinstance(value, bool):
        return ValueType.BOOL
    if isinstance(value, int):
        if 0 <= value < 1 << 32:
            return ValueType.UINT32
        if -(1 << 31) <= value < 0:
            return ValueType.INT32
        if 0 <= value < 1 << 64:
            return ValueType.UINT64
        if -(1 << 63) <= value < 0:
            return ValueType.INT64
        raise FormatError(f"GGUF metadata {key!r}: integer {value} does not fit 64 bits")
    if isinstance(value, float):
        return ValueType.FLOAT32
    if isinstance(value, str):
        return ValueType.STRING
    if isinstance(value, (list, tuple)):
        if not value:
            raise FormatError(f"GGUF metadata {key!r}: an empty array needs its element type in types=")
        elem = _infer_type(value[0], key)
        if elem == ValueType.UINT32 and any(isinstance(v, int) and v < 0 for v in value):
            elem = ValueType.INT32
        if elem == ValueType.ARRAY:
            raise FormatError(f"GGUF metadata {key!r}: give nested arrays their types in types=")
        return (ValueType.ARRAY, elem)
    raise FormatError(f"GGUF metadata {key!r}: cannot store a {type(value).__name__}")


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: int, value, key: str) -> bytes:
    try:
        if vtype in _SCALAR_CODES:
            return struct.pack(_SCALAR_CODES[vtype], value)
        if vtype == ValueType.BOOL:
            if not isinstance(value, bool):
                raise FormatError(f"GGUF metadata {key!r}: BOOL value must be a bool, got {value!r}")
            return bytes([int(value)])
        if vtype == ValueType.STRING:
            if not isinstance(value, str):
                raise FormatError(f"GGUF metadata {key!r}: STRING value must be a str, got {type(value).__name__}")
            return _string(value)
    except struct.error as exc:
        raise FormatError(f"GGUF metadata {key!r}: {value!r} does not fit {ValueType.NAMES[vtype]} ({exc})") from None
    raise FormatError(f"GGUF metadata {key!r}: unknown value type {vtype!r}")


def _array(elem: int, values, key: str) -> bytes:
    head = struct.pack("<IQ", elem, len(values))
    if elem in _SCALAR_CODES:
        dtype = np.dtype(_SCALARS[elem][1])
        arr = np.asarray(values)
        if arr.dtype.kind in "iu" and dtype.kind in "iu":
            info = np.iinfo(dtype)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise FormatError(f"GGUF metadata {key!r}: values out of range for {ValueType.NAMES[elem]}")
        return head + np.asarray(values, dtype=dtype).tobytes()
    if elem == ValueType.STRING:
        return head + b"".join(_string(v) for v in values)
    if elem == ValueType.BOOL:
        return head + bytes(int(bool(v)) for v in values)
    raise FormatError(f"GGUF metadata {key!r}: arrays of {ValueType.NAMES[elem]} are not written")


def _kv(key: str, value, vtype) -> bytes:
    if isinstance(vtype, tuple):
        return _string(key) + struct.pack("<I", ValueType.ARRAY) + _array(vtype[1], list(value), key)
    return _string(key) + struct.pack("<I", vtype) + _value(vtype, value, key)


def _tensor_record(name: str, t) -> tuple:
    """(ggml type id, dims ne[0] first, bytes as a uint8 tensor) of one tensor."""
    if isinstance(t, QuantizedWeight):
        if not isinstance(t.format, GGUF):
            raise FormatError(f"tensor {name!r}: GGUF files hold GGUF block types, got {t.format.spec()}")
        n, k = t.shape
        data = t.tensors["blocks"].contiguous().cpu().reshape(-1)
        return BLOCK_TYPES[t.format.type].ggml_type, (k, n), data
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"tensor {name!r}: expected a torch.Tensor or QuantizedWeight, got {type(t).__name__}")
    if t.dtype not in _DENSE_TYPES:
        raise FormatError(f"tensor {name!r}: dtype {t.dtype} has no GGUF type ({sorted(map(str, _DENSE_TYPES))})")
    if not 1 <= t.dim() <= MAX_DIMS or t.numel() == 0:
        raise FormatError(f"tensor {name!r}: GGUF holds 1 to {MAX_DIMS} non-empty dims, got shape {tuple(t.shape)}")
    data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return _TYPE_ID[_DENSE_TYPES[t.dtype]], tuple(reversed(t.shape)), data


def write_gguf(
    path,
    metadata: Mapping[str, Any],
    tensors: Mapping[str, Union[torch.Tensor, QuantizedWeight]],
    types: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> str:
    """Write a GGUF v3 file (see the module docstring). Returns its absolute path."""
    types = dict(types or {})
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"general.alignment must be a positive power of two, got {alignment!r}")
    kv = [_kv(key, value, types.get(key) or _infer_type(value, key)) for key, value in metadata.items()]
    records = []
    offset = 0
    infos = []
    for name, t in tensors.items():
        type_id, dims, data = _tensor_record(name, t)
        records.append(data)
        infos.append(_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", type_id, offset))
        offset += -(-data.numel() // alignment) * alignment
    header = MAGIC + struct.pack("<IQQ", VERSION, len(infos), len(kv)) + b"".join(kv) + b"".join(infos)
    with atomic_output(path, overwrite=overwrite, is_dir=False) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(b"\0" * (-len(header) % alignment))
            for data in records:
                fh.write(data.numpy().tobytes())
                fh.write(b"\0" * (-data.numel() % alignment))
    return os.path.abspath(os.fspath(path))


__all__ = ["write_gguf", "VERSION"]
