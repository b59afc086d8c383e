"""A hardened reader for GGUF files (llama.cpp's model format), versions 2 and 3.

    with pyquant.io.gguf.GGUFFile(path) as f:
        f.metadata["llama.block_count"]          # plain Python values
        f.tensor_info("blk.0.attn_q.weight")     # type, dims (ne[0] first), offset
        qw = f.tensor("blk.0.attn_q.weight")     # QuantizedWeight(GGUF("Q4_1"), ...)
        norm = f.tensor("blk.0.attn_norm.weight")  # torch.Tensor for F32/F16/BF16/...

The file is treated as untrusted input. Every count, length, type id, number of
dims, dim, alignment and offset read from it is checked with Python's unbounded
integers against the bytes actually left in the file *before* anything is
allocated or looped over, so a malformed file costs at most work and memory
proportional to its own size and ends in :class:`pyquant.FormatError` whose
message starts with ``"GGUF offset 0x...:"`` (the byte where the bad field
starts) and says what is wrong. The exception also carries ``.offset``.

Decisions worth knowing:

* Versions 2 and 3 only. v1 (32-bit counts and string lengths) and unknown
  versions are rejected, and so are big-endian files (a v3 feature llama.cpp
  writes only on request): the tensor data would need byte swapping.
* Tensor types: every ggml type whose block layout is known (the table below)
  is accepted at open, so its data extent can be checked. A type id not in the
  table makes the *open* fail: without its block size nothing about the data
  section could be validated. Known types that pyquant has no container for
  (IQ*, TQ*, Q8_1, Q8_K, MXFP4...) raise FormatError only when that tensor is
  requested with :meth:`GGUFFile.tensor`; their bytes stay readable through
  :meth:`GGUFFile.tensor_bytes`.
* Tensors need 1 to 4 dims, each >= 1; ``ne[0]`` must be a multiple of the
  type's block size; offsets must be multiples of the alignment; data must lie
  inside the file; tensors must not overlap; names and keys must be unique.
* ``general.alignment``, when present, must be an integer power of two.
* Strings must be valid UTF-8; bools must be 0 or 1; arrays nest at most
  ``MAX_ARRAY_DEPTH`` levels deep.
* :meth:`GGUFFile.tensor` returns a **copy** of the tensor's bytes (one
  tensor's worth of memory; nothing else of the file is read). The copy is
  writable and stays valid after :meth:`close`. Views are not offered: the
  mapping is read-only, so writing through a view would crash the process,
  and a live view would keep the mapping from being closed.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from ..errors import FormatError
from ..formats.base import QuantizedWeight
from ..formats.gguf import BLOCK_TYPES_BY_ID, GGUF

__all__ = ["GGUFFile", "TensorInfo", "GGML_TYPES", "ValueType", "MAX_ARRAY_DEPTH"]

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8  # arrays of arrays...; bounds Python recursion, real files use 1


class ValueType:
    """Metadata value type ids (gguf_type in ggml's gguf.h)."""

    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
    NAMES = (
        "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32",
        "BOOL", "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64",
    )


# Fixed-size value types: id -> (struct code, little-endian numpy dtype).
_SCALARS = {
    ValueType.UINT8: ("<B", "<u1"),
    ValueType.INT8: ("<b", "<i1"),
    ValueType.UINT16: ("<H", "<u2"),
    ValueType.INT16: ("<h", "<i2"),
    ValueType.UINT32: ("<I", "<u4"),
    ValueType.INT32: ("<i", "<i4"),
    ValueType.FLOAT32: ("<f", "<f4"),
    ValueType.UINT64: ("<Q", "<u8"),
    ValueType.INT64: ("<q", "<i8"),
    ValueType.FLOAT64: ("<d", "<f8"),
}
_SCALAR_STRUCTS = {t: struct.Struct(code) for t, (code, _) in _SCALARS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_INT_TYPES = frozenset(
    (ValueType.UINT8, ValueType.INT8, ValueType.UINT16, ValueType.INT16, ValueType.UINT32,
     ValueType.INT32, ValueType.UINT64, ValueType.INT64)
)


class GGMLType(NamedTuple):
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block


# ggml_type id -> layout. Ids 4 and 5 (Q4_2, Q4_3) were removed from ggml long ago
# and 31-33, 36-38 are retired interleaved layouts: all rejected as unknown.
GGML_TYPES: Dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    9: GGMLType("Q8_1", 32, 36),
    10: GGMLType("Q2_K", 256, 84),
    11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144),
    13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210),
    15: GGMLType("Q8_K", 256, 292),
    16: GGMLType("IQ2_XXS", 256, 66),
    17: GGMLType("IQ2_XS", 256, 74),
    18: GGMLType("IQ3_XXS", 256, 98),
    19: GGMLType("IQ1_S", 256, 50),
    20: GGMLType("IQ4_NL", 32, 18),
    21: GGMLType("IQ3_S", 256, 110),
    22: GGMLType("IQ2_S", 256, 82),
    23: GGMLType("IQ4_XS", 256, 136),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", 256, 56),
    30: GGMLType("BF16", 1, 2),
    34: GGMLType("TQ1_0", 256, 54),
    35: GGMLType("TQ2_0", 256, 66),
    39: GGMLType("MXFP4", 32, 17),
    40: GGMLType("NVFP4", 64, 36),
    41: GGMLType("Q1_0", 128, 18),
}
# Q8_1 is 32 x int8 + fp16 d + fp16 s = 36 bytes (gguf-py lists 40, which does not
# match ggml's block_q8_1). It is only an activation format; no file stores it.

# Element types returned as plain torch tensors. numpy has no bfloat16, so BF16
# is read as int16 and reinterpreted.
_DENSE = {
    "F32": ("<f4", None),
    "F16": ("<f2", None),
    "BF16": ("<i2", torch.bfloat16),
    "F64": ("<f8", None),
    "I8": ("<i1", None),
    "I16": ("<i2", None),
    "I32": ("<i4", None),
    "I64": ("<i8", None),
}


class TensorInfo(NamedTuple):
    """Where and what a tensor is. ``dims`` is in GGUF order (``ne[0]``, the
    contiguous dimension, first); ``shape`` is the torch order (reversed)."""

    name: str
    ggml_type: int
    type_name: str
    dims: Tuple[int, ...]
    offset: int  # relative to the data section, as stored
    data_offset: int  # absolute file offset of the first byte
    nbytes: int
    info_offset: int  # file offset of this tensor's info record (for messages)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(reversed(self.dims))


def _fmt_size(n: int) -> str:
    if n >= 1 << 20 and n & (n - 1) == 0:
        return f"{n} (2**{n.bit_length() - 1})"
    return str(n)


def _error(offset: int, reason: str, path: Optional[str] = None) -> FormatError:
    where = f" in {path}" if path else ""
    err = FormatError(f"GGUF offset 0x{offset:x}{where}: {reason}")
    err.offset = offset
    return err


class _Parser:
    """A cursor over the mapped file. Every read checks the remaining bytes first."""

    def __init__(self, buf, size: int, path: str):
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0

    def fail(self, reason: str, at: Optional[int] = None) -> FormatError:
        return _error(self.pos if at is None else at, reason, self.path)

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"{what} needs {_fmt_size(n)} bytes but only {self.size - self.pos} are left in the file "
                f"(file size {self.size})"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def count(self, what: str, min_item_bytes: int) -> int:
        """A uint64 element count, bounded by what the rest of the file can hold."""
        start = self.pos
        n = self.u64(what)
        if n * min_item_bytes > self.size - self.pos:
            raise self.fail(
                f"{what} {_fmt_size(n)} needs at least {_fmt_size(n * min_item_bytes)} bytes "
                f"but only {self.size - self.pos} are left in the file",
                at=start,
            )
        return n

    def string(self, what: str) -> str:
        start = self.pos
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(
                f"{what}: string length {_fmt_size(n)} exceeds the {self.size - self.pos} bytes left in the file",
                at=start,
            )
        raw = self.buf[self.pos : self.pos + n]
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})", at=start) from None
        self.pos += n
        return s

    def string_array(self, n: int, what: str) -> List[str]:
        # The 49k-entry tokenizer vocabularies go through here: keep the loop tight.
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out = []
        append = out.append
        try:
            for i in range(n):
                if size - pos < 8:
                    self.pos = pos
                    self.need(8, f"length of {what}[{i}]")
                (ln,) = unpack(buf, pos)
                pos += 8
                if ln > size - pos:
                    self.pos = pos - 8
                    raise self.fail(
                        f"{what}[{i}]: string length {_fmt_size(ln)} exceeds the {size - pos} bytes left in the file"
                    )
                append(buf[pos : pos + ln].decode("utf-8"))
                pos += ln
        except UnicodeDecodeError as exc:
            self.pos = pos - 8
            raise self.fail(f"{what}[{len(out)}] is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        self.pos = pos
        return out

    def value_type(self, what: str) -> int:
        start = self.pos
        t = self.u32(f"value type of {what}")
        if t >= len(ValueType.NAMES):
            raise self.fail(f"{what} has unknown value type {t} (known: 0..{len(ValueType.NAMES) - 1})", at=start)
        return t

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALAR_STRUCTS:
            st = _SCALAR_STRUCTS[vtype]
            self.need(st.size, f"{ValueType.NAMES[vtype]} value of {what}")
            (v,) = st.unpack_from(self.buf, self.pos)
            self.pos += st.size
            return v
        if vtype == ValueType.BOOL:
            self.need(1, f"BOOL value of {what}")
            b = self.buf[self.pos]
            if b > 1:
                raise self.fail(f"BOOL value of {what} is {b}, not 0 or 1")
            self.pos += 1
            return bool(b)
        if vtype == ValueType.STRING:
            return self.string(what)
        # ARRAY: element type, count, elements
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} levels deep")
        etype = self.value_type(f"elements of {what}")
        if etype in _SCALARS:
            itemsize = _SCALAR_STRUCTS[etype].size
            n = self.count(f"{what}: array length", itemsize)
            arr = np.frombuffer(self.buf, dtype=_SCALARS[etype][1], count=n, offset=self.pos)
            out = arr.tolist()
            del arr  # release the buffer export so the mapping can be closed
            self.pos += n * itemsize
            return out
        if etype == ValueType.BOOL:
            n = self.count(f"{what}: array length", 1)
            arr = np.frombuffer(self.buf, dtype=np.uint8, count=n, offset=self.pos)
            bad = np.flatnonzero(arr > 1)
            if bad.size:
                at = self.pos + int(bad[0])
                del arr
                raise self.fail(f"BOOL element {int(bad[0])} of {what} is not 0 or 1", at=at)
            out = (arr != 0).tolist()
            del arr
            self.pos += n
            return out
        if etype == ValueType.STRING:
            n = self.count(f"{what}: array length", 8)
            return self.string_array(n, what)
        # array of arrays: each element is at least an element type and a count
        n = self.count(f"{what}: array length", 12)
        return [self.value(ValueType.ARRAY, f"{what}[{i}]", depth + 1) for i in range(n)]


class GGUFFile:
    """A GGUF v2/v3 file opened read-only through mmap. See the module docstring."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._file = None
        self._mm = None
        self._file = open(self.path, "rb")
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            if self.file_size == 0:
                raise _error(0, "file is empty (a GGUF file starts with the magic b'GGUF')", self.path)
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse()
        except BaseException:
            self.close()
            raise

    # --- parsing ----------------------------------------------------------------
    def _parse(self) -> None:
        p = _Parser(self._mm, self.file_size, self.path)
        p.need(4, "magic")
        magic = self._mm[0:4]
        if magic != MAGIC:
            raise p.fail(f"bad magic {magic!r}, expected {MAGIC!r}: not a GGUF file")
        p.pos = 4
        version = p.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in SUPPORTED_VERSIONS:
                raise p.fail(f"big-endian GGUF v{swapped} files are not supported", at=4)
            if version == 1:
                raise p.fail(
                    "GGUF v1 is not supported (it uses 32-bit counts and lengths); re-convert the model "
                    "with a current llama.cpp", at=4,
                )
            raise p.fail(f"unknown GGUF version {version} (supported: 2, 3)", at=4)
        self.version = version

        tensor_count_at = p.pos
        tensor_count = p.u64("tensor_count")
        kv_count_at = p.pos
        kv_count = p.u64("kv_count")
        # Smallest records: key (8-byte length) + type (4) + 1-byte value, and
        # name length (8) + n_dims (4) + dim (8) + type (4) + offset (8).
        if kv_count * 13 > p.left():
            raise p.fail(
                f"kv_count {_fmt_size(kv_count)} needs at least {_fmt_size(kv_count * 13)} bytes "
                f"but only {p.left()} are left in the file", at=kv_count_at,
            )
        if kv_count * 13 + tensor_count * 32 > p.left():
            raise p.fail(
                f"tensor_count {_fmt_size(tensor_count)} needs at least {_fmt_size(tensor_count * 32)} bytes "
                f"of tensor infos but only {p.left() - kv_count * 13} are left in the file", at=tensor_count_at,
            )

        metadata: Dict[str, Any] = {}
        types: Dict[str, Any] = {}
        offsets: Dict[str, int] = {}
        for i in range(kv_count):
            at = p.pos
            key = p.string(f"key #{i}")
            if key in metadata:
                raise p.fail(f"duplicate metadata key {key!r} (first at offset 0x{offsets[key]:x})", at=at)
            vtype = p.value_type(f"key {key!r}")
            value_at = p.pos
            metadata[key] = p.value(vtype, f"key {key!r}")
            if vtype == ValueType.ARRAY:
                types[key] = (vtype, _U32.unpack_from(self._mm, value_at)[0])
            else:
                types[key] = vtype
            offsets[key] = at
        self.metadata = metadata
        self.metadata_types = types  # key -> ValueType id, or (ARRAY, element type id)
        self._key_offsets = offsets

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in metadata:
            at = offsets["general.alignment"]
            atype = types["general.alignment"]
            if atype not in _INT_TYPES:
                tname = ValueType.NAMES[atype[0] if isinstance(atype, tuple) else atype]
                raise p.fail(f"general.alignment must be an integer, got a {tname}", at=at)
            if alignment <= 0 or alignment & (alignment - 1):
                raise p.fail(f"general.alignment {alignment} is not a positive power of two", at=at)
        self.alignment = alignment

        seen: Dict[str, int] = {}
        raw: List[Tuple[str, int, Tuple[int, ...], int, int]] = []
        for i in range(tensor_count):
            at = p.pos
            name = p.string(f"name of tensor #{i}")
            if name in seen:
                raise p.fail(f"duplicate tensor name {name!r} (first at offset 0x{seen[name]:x})", at=at)
            seen[name] = at
            nd_at = p.pos
            n_dims = p.u32(f"n_dims of tensor {name!r}")
            if n_dims < 1 or n_dims > MAX_DIMS:
                raise p.fail(f"tensor {name!r} has n_dims={n_dims}; GGUF allows 1..{MAX_DIMS}", at=nd_at)
            dims = []
            for d in range(n_dims):
                d_at = p.pos
                ne = p.u64(f"dim {d} of tensor {name!r}")
                if ne == 0 or ne >= 1 << 63:
                    raise p.fail(f"tensor {name!r} dim {d} is {ne}; dims must be in 1..2**63-1", at=d_at)
                dims.append(ne)
            t_at = p.pos
            ggml_type = p.u32(f"type of tensor {name!r}")
            if ggml_type not in GGML_TYPES:
                raise p.fail(f"tensor {name!r} has unknown ggml type id {ggml_type}", at=t_at)
            off = p.u64(f"offset of tensor {name!r}")
            raw.append((name, ggml_type, tuple(dims), off, at))

        self.data_offset = -(-p.pos // alignment) * alignment
        infos: Dict[str, TensorInfo] = {}
        for name, ggml_type, dims, off, at in raw:
            infos[name] = self._check_tensor(name, ggml_type, dims, off, at)
        by_start = sorted(infos.values(), key=lambda t: (t.data_offset, t.nbytes))
        for prev, cur in zip(by_start, by_start[1:]):
            if cur.data_offset < prev.data_offset + prev.nbytes:
                raise _error(
                    cur.info_offset,
                    f"tensor {cur.name!r} data [0x{cur.data_offset:x}, 0x{cur.data_offset + cur.nbytes:x}) "
                    f"overlaps tensor {prev.name!r} [0x{prev.data_offset:x}, 0x{prev.data_offset + prev.nbytes:x})",
                    self.path,
                )
        self._tensors = infos

    def _check_tensor(self, name, ggml_type, dims, off, at) -> TensorInfo:
        t = GGML_TYPES[ggml_type]
        if dims[0] % t.block_size:
            raise _error(
                at, f"tensor {name!r} ({t.name}) has ne[0]={dims[0]}, not a multiple of the block size {t.block_size}",
                self.path,
            )
        nelem = 1
        for d in dims:
            nelem *= d
        if nelem >= 1 << 63:
            raise _error(at, f"tensor {name!r} dims {list(dims)} hold {nelem} elements, more than 2**63-1", self.path)
        nbytes = nelem // t.block_size * t.type_size
        if off % self.alignment:
            raise _error(
                at, f"tensor {name!r} offset 0x{off:x} is not a multiple of the alignment {self.alignment}", self.path
            )
        start = self.data_offset + off
        if start + nbytes > self.file_size:
            raise _error(
                at,
                f"tensor {name!r} ({t.name} {list(dims)}, {nbytes} bytes) at data offset 0x{off:x} "
                f"(file offset 0x{start:x}) runs past the end of the file (size {self.file_size})",
                self.path,
            )
        return TensorInfo(name, ggml_type, t.name, dims, off, start, nbytes, at)

    # --- public API ---------------------------------------------------------------
    def tensor_names(self) -> List[str]:
        """Tensor names in file order."""
        return list(self._tensors)

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.path} ({len(self._tensors)} tensors)") from None

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensor_names())

    def __len__(self) -> int:
        return len(self._tensors)

    def _read(self, info: TensorInfo, np_dtype: str, count: int) -> np.ndarray:
        if self._mm is None:
            raise ValueError(f"GGUF file {self.path} is closed")
        view = np.frombuffer(self._mm, dtype=np_dtype, count=count, offset=info.data_offset)
        out = view.copy()
        del view  # release the buffer export so close() can unmap
        return out

    def tensor_bytes(self, name: str) -> torch.Tensor:
        """The tensor's raw bytes as a 1-D uint8 tensor (a copy), for any type."""
        info = self.tensor_info(name)
        return torch.from_numpy(self._read(info, "<u1", info.nbytes))

    def tensor(self, name: str):
        """The tensor as pyquant sees it (a copy out of the mapping).

        Block-quantized types pyquant supports give ``QuantizedWeight(GGUF(type),
        {"blocks": uint8 (N, K / block_size * type_size)}, (N, K))`` with
        ``K = ne[0]`` and ``N`` the product of the other dims. Dense types (F32,
        F16, BF16, F64, I8..I64) give a torch tensor of shape ``reversed(dims)``.
        """
        info = self.tensor_info(name)
        t = GGML_TYPES[info.ggml_type]
        if t.name in _DENSE:
            np_dtype, view_as = _DENSE[t.name]
            nelem = info.nbytes // t.type_size
            out = torch.from_numpy(self._read(info, np_dtype, nelem))
            if view_as is not None:
                out = out.view(view_as)
            return out.reshape(info.shape)
        if info.ggml_type in BLOCK_TYPES_BY_ID:
            k = info.dims[0]
            n = _prod(info.dims[1:])
            blocks = torch.from_numpy(self._read(info, "<u1", info.nbytes)).view(n, k // t.block_size * t.type_size)
            return QuantizedWeight(GGUF(t.name), {"blocks": blocks}, (n, k))
        raise FormatError(
            f"tensor {name!r} in {self.path} has ggml type {t.name} ({info.ggml_type}), which pyquant cannot "
            f"represent yet (supported: {sorted(_DENSE)} and {sorted(b.name for b in BLOCK_TYPES_BY_ID.values())}); "
            f"tensor_bytes() returns its raw bytes"
        )

    # --- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def closed(self) -> bool:
        return self._mm is None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._tensors)} tensors, {len(self.metadata)} keys"
        return f"GGUFFile({self.path!r}, v{getattr(self, 'version', '?')}, {state})"


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
