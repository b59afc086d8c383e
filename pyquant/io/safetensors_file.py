"""Read safetensors files as untrusted input: headers checked, tensors read straight into their buffers.

The format is an 8-byte little-endian header length, a JSON header (name ->
dtype, shape, data_offsets into the data section) and the raw little-endian
data. Nothing in it is code, so loading never executes anything; what can go
wrong is sizes: a header field announcing more bytes than the file holds
(a truncated shard), offsets outside the data section, a shape whose element
count disagrees with its byte range. Every such error names the file and the
tensor, and is raised while reading the header, before any tensor is built.

Tensors are read with one ``readinto`` into a tensor of their own (no mmap: a
mapping would count the whole shard against the process's memory while it is
open, and the file could change under it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from typing import Dict, Tuple

import torch

from ..errors import FormatError

# A real header is ~100 bytes per tensor; this bounds the allocation a hostile length field can cause.
MAX_HEADER_BYTES = 100 * 2**20

DTYPES: Dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a safetensors file lies, as its checked header says."""

    path: str
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int  # absolute file offsets of the data
    end: int

    @property
    def where(self) -> str:
        return f"{self.path}: tensor {self.name!r}"

    def read(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor, read from the file with one copy into its own memory (on ``"meta"``: its
        shape and dtype only, nothing read)."""
        if torch.device(device).type == "meta":
            return torch.empty(self.shape, dtype=self.dtype, device="meta")
        nbytes = self.end - self.begin
        raw = torch.empty(nbytes, dtype=torch.uint8, device="cpu")  # even under a meta-device context
        with open(self.path, "rb") as f:
            f.seek(self.begin)
            got = f.readinto(memoryview(raw.numpy()))
        if got != nbytes:
            raise FormatError(f"{self.where}: file ended after {got} of {nbytes} bytes (changed while loading?)")
        t = raw.view(self.dtype).reshape(self.shape) if nbytes else torch.empty(self.shape, dtype=self.dtype, device="cpu")
        return t.to(device)


def read_header(path: str) -> Dict[str, TensorEntry]:
    """Name -> :class:`TensorEntry` of every tensor in a safetensors file, after
    checking that each lies inside the file and matches its dtype and shape."""
    if sys.byteorder != "little":  # the data is little-endian; read() reinterprets bytes in place
        raise FormatError("reading safetensors needs a little-endian machine")
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise FormatError(f"{path}: header length {n} does not fit the file of {size} bytes (truncated?)")
            raw = f.read(n)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, data_len)
    return entries


def _entry(path: str, name: str, info, data_start: int, data_len: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise FormatError(f"{where}: header entry needs dtype, shape and data_offsets, got {info!r}")
    dtype = DTYPES.get(info["dtype"])
    if dtype is None:
        raise FormatError(f"{where}: unknown dtype {info['dtype']!r} (known: {sorted(DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise FormatError(f"{where}: data_offsets must be two integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise FormatError(f"{where}: data_offsets {offsets} are not an ordered pair of non-negative offsets")
    if end > data_len:
        raise FormatError(
            f"{where}: data runs to byte {end} of the data section but the file holds only {data_len} "
            f"(truncated shard?)"
        )
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end - begin != numel * itemsize:
        raise FormatError(
            f"{where}: {info['dtype']} {shape} needs {numel * itemsize} bytes, data_offsets give {end - begin}"
        )
    return TensorEntry(path, name, dtype, tuple(shape), data_start + begin, data_start + end)
