"""pyquant.io.gguf.GGUFFile against gguf-py's GGUFReader and against hand-built files.

The hand builder below writes GGUF bytes from the spec (little endian):
magic, version u32, tensor_count u64, kv_count u64, kv records (string key,
u32 value type, value), tensor infos (string name, u32 n_dims, u64 dims,
u32 ggml type, u64 offset), padding to the alignment, data. It is also used by
test_gguf_fuzz.py.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from tests.deps import require, smollm2_gguf
import torch

import pyquant
from pyquant import FormatError, QuantizedWeight
from pyquant.io.gguf import GGUFFile

gguf = require("gguf")

# --- spec constants, written out independently of the reader under test ---------
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_CODES = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
          U64: "<Q", I64: "<q", F64: "<d"}
# ggml type id -> (name, block size, bytes per block)
T_F32, T_F16, T_Q4_0, T_Q4_1, T_Q8_0, T_Q4_K, T_Q6_K, T_IQ2_XXS, T_I32, T_BF16 = 0, 1, 2, 3, 8, 12, 14, 16, 26, 30
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
         7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
         12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 16: ("IQ2_XXS", 256, 66),
         26: ("I32", 1, 4), 30: ("BF16", 1, 2)}


def gstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def encode_value(vtype, value) -> bytes:
    if vtype == ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(encode_value(etype, x) for x in items)
    if vtype == STRING:
        return gstr(value)
    if vtype == BOOL:
        return bytes([int(value)])
    return struct.pack(_CODES[vtype], value)


def tensor_nbytes(ggml_type, dims):
    _, bs, ts = TYPES[ggml_type]
    n = 1
    for d in dims:
        n *= d
    return n // bs * ts


def build_gguf(kvs=(), tensors=(), version=3, alignment=32, tensor_count=None, kv_count=None,
               magic=b"GGUF"):
    """Bytes of a GGUF file and the offsets of its fields.

    kvs: (key, vtype, value) with value (etype, items) for arrays, or raw bytes of a
    whole kv record. tensors: dicts with name, dims (ne order), type, data (bytes,
    default random of the right size) and optional offset. When alignment != 32 a
    general.alignment u32 key is added unless one is given.
    """
    kvs = list(kvs)
    if alignment != 32 and not any(isinstance(kv, tuple) and kv[0] == "general.alignment" for kv in kvs):
        kvs.append(("general.alignment", U32, alignment))
    layout = {"kv": [], "tensors": [], "fields": [(4, 4, "version")]}  # fields: (offset, width, what)
    fields = layout["fields"]
    out = bytearray(magic + struct.pack("<I", version))
    layout["tensor_count"] = len(out)
    fields += [(8, 8, "tensor_count"), (16, 8, "kv_count")]
    out += struct.pack("<Q", len(tensors) if tensor_count is None else tensor_count)
    layout["kv_count"] = len(out)
    out += struct.pack("<Q", len(kvs) if kv_count is None else kv_count)
    for kv in kvs:
        rec = {"start": len(out)}
        if isinstance(kv, (bytes, bytearray)):
            out += kv
        else:
            key, vtype, value = kv
            fields.append((len(out), 8, f"length of key {key!r}"))
            out += gstr(key)
            rec["type"] = len(out)
            fields.append((len(out), 4, f"type of {key!r}"))
            out += struct.pack("<I", vtype)
            rec["value"] = len(out)
            if vtype == ARRAY:
                fields += [(len(out), 4, f"element type of {key!r}"), (len(out) + 4, 8, f"length of {key!r}")]
            elif vtype == STRING:
                fields.append((len(out), 8, f"string length of {key!r}"))
            elif vtype in _CODES:
                fields.append((len(out), struct.calcsize(_CODES[vtype]), f"value of {key!r}"))
            out += encode_value(vtype, value)
        layout["kv"].append(rec)
    rng = np.random.default_rng(0)
    placed, cursor = [], 0
    for t in tensors:
        data = t.get("data")
        if data is None:
            data = rng.integers(0, 256, tensor_nbytes(t["type"], t["dims"]), dtype=np.uint8).tobytes()
        off = t.get("offset")
        if off is None:
            off = -(-cursor // alignment) * alignment
        if off + len(data) <= 1 << 24:  # a deliberately bogus offset gets no data
            cursor = max(cursor, off + len(data))
            placed.append((off, data))
        rec = {"start": len(out)}
        name = t["name"]
        fields.append((len(out), 8, f"name length of tensor {name!r}"))
        out += gstr(name)
        rec["n_dims"] = len(out)
        fields.append((len(out), 4, f"n_dims of {name!r}"))
        out += struct.pack("<I", len(t["dims"]))
        rec["dims"] = len(out)
        fields += [(len(out) + 8 * i, 8, f"dim {i} of {name!r}") for i in range(len(t["dims"]))]
        out += b"".join(struct.pack("<Q", d) for d in t["dims"])
        rec["type"] = len(out)
        fields.append((len(out), 4, f"type of {name!r}"))
        out += struct.pack("<I", t["type"])
        rec["offset"] = len(out)
        fields.append((len(out), 8, f"offset of {name!r}"))
        out += struct.pack("<Q", off)
        layout["tensors"].append(rec)
    data_start = -(-len(out) // alignment) * alignment
    layout["data_start"] = data_start
    out += bytes(data_start - len(out))
    data = bytearray(cursor)
    for off, d in placed:
        data[off:off + len(d)] = d
    out += data
    return bytes(out), layout


def write(tmp_path, data: bytes, name="t.gguf") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


# A spread of every metadata value type, arrays of every element type and nested arrays.
ALL_KVS = [
    ("general.architecture", STRING, "llama"),
    ("t.u8", U8, 255), ("t.i8", I8, -128), ("t.u16", U16, 65535), ("t.i16", I16, -32768),
    ("t.u32", U32, 2**32 - 1), ("t.i32", I32, -2**31), ("t.f32", F32, -1.5),
    ("t.bool_t", BOOL, True), ("t.bool_f", BOOL, False),
    ("t.str", STRING, "h\u00e9llo \u2603 \U0001F600"), ("t.empty_str", STRING, ""),
    ("t.u64", U64, 2**64 - 1), ("t.i64", I64, -2**63), ("t.f64", F64, 3.141592653589793),
    ("t.arr_u8", ARRAY, (U8, [0, 1, 255])), ("t.arr_i8", ARRAY, (I8, [-1, 2])),
    ("t.arr_u16", ARRAY, (U16, [7])), ("t.arr_i16", ARRAY, (I16, [-7, 7])),
    ("t.arr_u32", ARRAY, (U32, [1, 2**32 - 1])), ("t.arr_i32", ARRAY, (I32, [-5, 5])),
    ("t.arr_f32", ARRAY, (F32, [0.25, -2.0])), ("t.arr_bool", ARRAY, (BOOL, [True, False, True])),
    ("t.arr_str", ARRAY, (STRING, ["a", "", "\u00fc\u00df"])), ("t.arr_u64", ARRAY, (U64, [2**63])),
    ("t.arr_i64", ARRAY, (I64, [-3])), ("t.arr_f64", ARRAY, (F64, [1e300, -0.0])),
    ("t.arr_empty", ARRAY, (U32, [])),
    ("t.arr_arr", ARRAY, (ARRAY, [(I32, [1, 2]), (STRING, ["x"]), (ARRAY, [(U8, [9])])])),
    ("t.arr_arr_empty", ARRAY, (ARRAY, [(F32, []), (I8, [-1])])),
]


def expected_value(vtype, value):
    if vtype == ARRAY:
        etype, items = value
        return [expected_value(etype, x) for x in items]
    if vtype == F32:
        return float(np.float32(value))
    return value


def mixed_tensors():
    rng = np.random.default_rng(1)
    return [
        {"name": "f32", "dims": (5, 3), "type": T_F32,
         "data": rng.standard_normal(15).astype("<f4").tobytes()},
        {"name": "f16", "dims": (7,), "type": T_F16, "data": rng.standard_normal(7).astype("<f2").tobytes()},
        {"name": "bf16", "dims": (4, 2, 3), "type": T_BF16,
         "data": (rng.standard_normal(24).astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()},
        {"name": "q4_0", "dims": (64, 3), "type": T_Q4_0},
        {"name": "q4_k.3d", "dims": (256, 2, 3), "type": T_Q4_K},
        {"name": "q8_0", "dims": (32, 1, 1, 2), "type": T_Q8_0},
        {"name": "i32", "dims": (3,), "type": T_I32, "data": np.array([1, -2, 3], "<i4").tobytes()},
    ]


# --- the real model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    path = smollm2_gguf()
    return path, gguf.GGUFReader(path)


def test_real_metadata_matches_gguf(real):
    path, ref = real
    with GGUFFile(path) as f:
        assert f.version == 3
        ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(f.metadata) == ref_keys
        for key in ref_keys:
            field = ref.fields[key]
            assert f.metadata[key] == field.contents(), key
            want_type = field.types[0] if len(field.types) == 1 else tuple(field.types[:2])
            assert f.metadata_types[key] == want_type, key
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 49152
        assert f.alignment == ref.alignment
        assert f.data_offset == ref.data_offset


def test_real_tensors_match_gguf(real):
    path, ref = real
    with GGUFFile(path) as f:
        assert f.tensor_names() == [t.name for t in ref.tensors]
        for t in ref.tensors:
            info = f.tensor_info(t.name)
            assert info.ggml_type == int(t.tensor_type), t.name
            assert info.type_name == t.tensor_type.name
            assert list(info.dims) == [int(d) for d in t.shape], t.name
            assert info.data_offset == t.data_offset and info.nbytes == t.n_bytes, t.name
            got = f.tensor(t.name)
            if isinstance(got, QuantizedWeight):
                assert got.format == pyquant.GGUF(t.tensor_type.name)
                assert got.shape == (int(np.prod(t.shape[1:])), int(t.shape[0]))
                assert got.tensors["blocks"].shape == tuple(t.data.shape)
                assert got.tensors["blocks"].numpy().tobytes() == t.data.tobytes(), t.name
            else:
                assert t.tensor_type == gguf.GGMLQuantizationType.F32
                assert got.dtype == torch.float32 and tuple(got.shape) == tuple(reversed(info.dims))
                assert torch.equal(got, torch.from_numpy(np.array(t.data)).reshape(got.shape)), t.name
            assert f.tensor_bytes(t.name).numpy().tobytes() == t.data.tobytes()


# --- files written by gguf-py (v3) ------------------------------------------------------
def _has_empty_array(vtype, value):
    if vtype != ARRAY:
        return False
    etype, items = value
    return not items or any(_has_empty_array(etype, x) for x in items)


# gguf-py's writer refuses empty arrays
WRITER_KVS = [kv for kv in ALL_KVS if not _has_empty_array(kv[1], kv[2])]


def _write_with_gguf(path, alignment=None):
    w = gguf.GGUFWriter(path, arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, vtype, value in WRITER_KVS:
        if key == "general.architecture":
            continue
        if vtype == ARRAY:
            etype, items = value
            if etype == ARRAY:  # gguf-py infers nested element types itself
                w.add_array(key, expected_value(vtype, value))
            else:
                w.add_key_value(key, list(items), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType(etype))
        else:
            w.add_key_value(key, value, gguf.GGUFValueType(vtype))
    for t in mixed_tensors():
        name, dims, ttype = t["name"], t["dims"], t["type"]
        data = t.get("data") or np.random.default_rng(2).integers(
            0, 256, tensor_nbytes(ttype, dims), dtype=np.uint8).tobytes()
        shape = tuple(reversed(dims))
        if ttype == T_F32:
            w.add_tensor(name, np.frombuffer(data, "<f4").reshape(shape))
        elif ttype == T_F16:
            w.add_tensor(name, np.frombuffer(data, "<f2").reshape(shape))
        elif ttype == T_I32:
            w.add_tensor(name, np.frombuffer(data, "<i4").reshape(shape))
        elif ttype == T_BF16:
            w.add_tensor(name, np.frombuffer(data, "<u2").reshape(shape),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            rows = int(np.prod(shape[:-1]))
            w.add_tensor(name, np.frombuffer(data, np.uint8).reshape(rows, -1).reshape(*shape[:-1], -1),
                         raw_dtype=gguf.GGMLQuantizationType(ttype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64, 8])
def test_gguf_writer_file_matches_gguf_reader(tmp_path, alignment):
    path = str(tmp_path / "w.gguf")
    _write_with_gguf(path, alignment)
    ref = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        assert f.version == 3
        assert f.alignment == (alignment or 32)
        keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(f.metadata) == keys
        for k in keys:
            if ref.fields[k].types[:2] == [gguf.GGUFValueType.ARRAY] * 2:
                continue  # gguf-py's contents() flattens arrays of arrays; checked against the spec below
            assert f.metadata[k] == ref.fields[k].contents(), k
        for key, vtype, value in WRITER_KVS:
            assert f.metadata[key] == expected_value(vtype, value), key
        assert f.tensor_names() == [t.name for t in ref.tensors]
        for t in ref.tensors:
            info = f.tensor_info(t.name)
            assert info.data_offset % f.alignment == 0
            assert info.data_offset == t.data_offset and list(info.dims) == [int(d) for d in t.shape]
            got = f.tensor(t.name)
            if isinstance(got, QuantizedWeight):
                assert got.tensors["blocks"].numpy().tobytes() == t.data.tobytes()
            elif t.tensor_type == gguf.GGMLQuantizationType.BF16:
                assert got.dtype == torch.bfloat16 and tuple(got.shape) == tuple(reversed(info.dims))
                assert got.view(torch.int16).numpy().tobytes() == t.data.tobytes()
            else:
                assert tuple(got.shape) == tuple(reversed(info.dims))
                assert got.numpy().tobytes() == t.data.tobytes()


# --- hand-built files (v2 and v3) --------------------------------------------------------
@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("alignment", [1, 8, 32, 128])
def test_hand_built(tmp_path, version, alignment):
    tensors = mixed_tensors()
    data, layout = build_gguf(ALL_KVS, tensors, version=version, alignment=alignment)
    path = write(tmp_path, data)
    with GGUFFile(path) as f:
        assert f.version == version
        assert f.alignment == alignment
        assert f.data_offset == layout["data_start"]
        for key, vtype, value in ALL_KVS:
            assert f.metadata[key] == expected_value(vtype, value), key
            assert f.metadata_types[key] == (vtype if vtype != ARRAY else (ARRAY, value[0]))
        assert f.tensor_names() == [t["name"] for t in tensors]
        for t in tensors:
            info = f.tensor_info(t["name"])
            assert info.dims == t["dims"] and info.ggml_type == t["type"]
            assert info.offset % alignment == 0
            raw = data[info.data_offset:info.data_offset + info.nbytes]
            assert len(raw) == tensor_nbytes(t["type"], t["dims"])
            if "data" in t:
                assert raw == t["data"]
            got = f.tensor(t["name"])
            if isinstance(got, QuantizedWeight):
                name, bs, ts = TYPES[t["type"]]
                k, n = t["dims"][0], int(np.prod(t["dims"][1:]))
                assert got.format == pyquant.GGUF(name) and got.shape == (n, k)
                assert tuple(got.tensors["blocks"].shape) == (n, k // bs * ts)
                assert got.tensors["blocks"].numpy().tobytes() == raw
            else:
                assert tuple(got.shape) == tuple(reversed(t["dims"]))
                assert got.contiguous().view(torch.uint8).numpy().tobytes() == raw
        bf = f.tensor("bf16")
        assert bf.dtype == torch.bfloat16
        f32 = np.frombuffer(tensors[0]["data"], "<f4").reshape(3, 5)
        assert torch.equal(f.tensor("f32"), torch.from_numpy(f32.copy()))
        assert f.tensor("f16").dtype == torch.float16
        assert torch.equal(f.tensor("i32"), torch.tensor([1, -2, 3], dtype=torch.int32))
    ref = gguf.GGUFReader(path)  # gguf-py reads the hand-built bytes the same way
    assert [t.name for t in ref.tensors] == [t["name"] for t in tensors]
    for t in ref.tensors:
        assert f.tensor_info(t.name).data_offset == t.data_offset
        assert data[t.data_offset:t.data_offset + t.n_bytes] == t.data.tobytes()


def test_tensor_copy_outlives_file(tmp_path):
    data, _ = build_gguf([], mixed_tensors())
    f = GGUFFile(write(tmp_path, data))
    a = f.tensor("f32")
    q = f.tensor("q4_0")
    before = a.clone()
    a.add_(1)  # a copy: writable, the file is untouched
    assert torch.equal(f.tensor("f32"), before)
    f.close()
    assert f.closed
    assert torch.equal(a, before + 1) and q.tensors["blocks"].numel() == 3 * 2 * 18
    with pytest.raises(ValueError, match="closed"):
        f.tensor("f32")
    f.close()  # idempotent


def test_unsupported_known_type(tmp_path):
    data, _ = build_gguf([], [{"name": "iq", "dims": (256, 2), "type": T_IQ2_XXS}])
    with GGUFFile(write(tmp_path, data)) as f:
        assert f.tensor_info("iq").type_name == "IQ2_XXS"
        assert f.tensor_bytes("iq").numel() == 2 * 66
        with pytest.raises(FormatError, match="IQ2_XXS"):
            f.tensor("iq")


def test_missing_tensor_name(tmp_path):
    data, _ = build_gguf([], mixed_tensors())
    with GGUFFile(write(tmp_path, data)) as f:
        with pytest.raises(KeyError, match="nope"):
            f.tensor("nope")
        assert "f32" in f and len(f) == len(mixed_tensors())


def test_no_tensors_no_kvs(tmp_path):
    data, _ = build_gguf([], [])
    with GGUFFile(write(tmp_path, data)) as f:
        assert f.metadata == {} and f.tensor_names() == []
    # an empty array ending exactly at the end of the file
    data, layout = build_gguf([("e", ARRAY, (U32, []))], [])
    end = layout["kv"][0]["value"] + 12
    with GGUFFile(write(tmp_path, data[:end])) as f:
        assert f.metadata == {"e": []} and f.metadata_types["e"] == (ARRAY, U32)


# --- malformed files ----------------------------------------------------------------------
def _opens_or_formaterror(path):
    try:
        with GGUFFile(path) as f:
            for name in f.tensor_names():
                f.tensor(name)
        return None
    except FormatError as exc:
        return exc


def test_truncated_at_every_byte(tmp_path):
    data, layout = build_gguf(
        [("a", U32, 7), ("s", STRING, "xyz"), ("arr", ARRAY, (STRING, ["p", "qq"])),
         ("nest", ARRAY, (ARRAY, [(U8, [1, 2])]))],
        [{"name": "w", "dims": (32, 2), "type": T_Q4_0}, {"name": "n", "dims": (4,), "type": T_F32}],
    )
    path = str(tmp_path / "cut.gguf")
    for n in range(len(data)):
        with open(path, "wb") as fh:
            fh.write(data[:n])
        with pytest.raises(FormatError, match=r"GGUF offset 0x[0-9a-f]+"):
            GGUFFile(path)
    with open(path, "wb") as fh:
        fh.write(data)
    assert _opens_or_formaterror(path) is None


def _err(tmp_path, data, pattern):
    with pytest.raises(FormatError, match=pattern) as ei:
        GGUFFile(write(tmp_path, data))
    assert str(ei.value).startswith("GGUF offset 0x")
    return ei.value


def test_bad_magic_and_versions(tmp_path):
    good, _ = build_gguf([("a", U8, 1)])
    _err(tmp_path, b"GGUG" + good[4:], "bad magic")
    _err(tmp_path, build_gguf([], version=1)[0], "v1 is not supported")
    _err(tmp_path, build_gguf([], version=4)[0], "unknown GGUF version 4")
    _err(tmp_path, build_gguf([], version=0)[0], "unknown GGUF version 0")
    _err(tmp_path, good[:4] + struct.pack(">I", 3) + good[8:], "big-endian")
    _err(tmp_path, b"", "empty")


def test_huge_string_length(tmp_path):
    data, layout = build_gguf([("key", STRING, "value")])
    at = layout["kv"][0]["value"]
    bad = data[:at] + struct.pack("<Q", 2**40) + data[at + 8:]
    e = _err(tmp_path, bad, r"string length 1099511627776 \(2\*\*40\) exceeds the \d+ bytes left")
    assert e.offset == at
    # the key's own length
    at = layout["kv"][0]["start"]
    _err(tmp_path, data[:at] + struct.pack("<Q", 2**64 - 1) + data[at + 8:], "string length")


def test_huge_counts(tmp_path):
    data, layout = build_gguf([("key", ARRAY, (U32, [1, 2, 3]))], [{"name": "n", "dims": (4,), "type": T_F32}])
    at = layout["kv"][0]["value"] + 4
    for n in (2**63, 2**62, 2**64 - 1, 10**6):
        _err(tmp_path, data[:at] + struct.pack("<Q", n) + data[at + 8:], "array length")
    for n in (2**64 - 1, 2**32):
        _err(tmp_path, data[:layout["kv_count"]] + struct.pack("<Q", n) + data[layout["kv_count"] + 8:],
             "kv_count")
        _err(tmp_path, data[:layout["tensor_count"]] + struct.pack("<Q", n) + data[layout["tensor_count"] + 8:],
             "tensor_count")
    # huge string array and array-of-arrays counts
    data, layout = build_gguf([("s", ARRAY, (STRING, ["a"])), ("aa", ARRAY, (ARRAY, [(U8, [1])]))])
    for rec in layout["kv"]:
        at = rec["value"] + 4
        _err(tmp_path, data[:at] + struct.pack("<Q", 2**61) + data[at + 8:], "array length")


def test_too_deep_nesting(tmp_path):
    value = (U8, [1])
    for _ in range(12):
        value = (ARRAY, [value])
    _err(tmp_path, build_gguf([("deep", ARRAY, value)])[0], "nested more than")


def test_bad_value_types(tmp_path):
    data, layout = build_gguf([("key", U32, 5)])
    at = layout["kv"][0]["type"]
    _err(tmp_path, data[:at] + struct.pack("<I", 13) + data[at + 4:], "unknown value type 13")
    _err(tmp_path, data[:at] + struct.pack("<I", 2**32 - 1) + data[at + 4:], "unknown value type")
    data, layout = build_gguf([("key", ARRAY, (U32, [5]))])
    at = layout["kv"][0]["value"]
    _err(tmp_path, data[:at] + struct.pack("<I", 99) + data[at + 4:], "unknown value type 99")
    _err(tmp_path, build_gguf([("b", BOOL, 2)])[0], "not 0 or 1")
    _err(tmp_path, build_gguf([("b", ARRAY, (BOOL, [1, 0, 7]))])[0], "not 0 or 1")
    _err(tmp_path, build_gguf([("s", STRING, b"\xff\xfe")])[0], "not valid UTF-8")
    _err(tmp_path, build_gguf([("s", ARRAY, (STRING, ["ok", b"\xc3"]))])[0], "not valid UTF-8")
    _err(tmp_path, build_gguf([(b"\x80", U8, 1)])[0], "not valid UTF-8")


def test_duplicates(tmp_path):
    _err(tmp_path, build_gguf([("k", U8, 1), ("j", U8, 1), ("k", U32, 2)])[0], "duplicate metadata key 'k'")
    t = {"name": "w", "dims": (4,), "type": T_F32}
    _err(tmp_path, build_gguf([], [t, dict(t)])[0], "duplicate tensor name 'w'")


def test_bad_dims(tmp_path):
    def bad(**kw):
        t = {"name": "w", "dims": (4, 2), "type": T_F32}
        t.update(kw)
        return t
    data, layout = build_gguf([], [bad()])
    at = layout["tensors"][0]["n_dims"]
    e = _err(tmp_path, data[:at] + struct.pack("<I", 9) + data[at + 4:], "n_dims=9")
    assert e.offset == at
    _err(tmp_path, data[:at] + struct.pack("<I", 0) + data[at + 4:], "n_dims=0")
    _err(tmp_path, data[:at] + struct.pack("<I", 2**32 - 1) + data[at + 4:], "n_dims")
    _err(tmp_path, build_gguf([], [bad(dims=(4, 0), data=b"")])[0], "dim 1 is 0")
    _err(tmp_path, build_gguf([], [bad(dims=(2**63, 1), data=b"")])[0], "dim 0 is")
    # elements overflow int64 although each dim is fine
    _err(tmp_path, build_gguf([], [bad(dims=(2**32, 2**32), data=b"")])[0], "more than 2\\*\\*63-1")
    # huge but int64-representable: caught by the file size
    _err(tmp_path, build_gguf([], [bad(dims=(2**20, 2**20, 2**20), data=b"")])[0], "runs past the end")
    _err(tmp_path, build_gguf([], [bad(dims=(48, 2), type=T_Q4_0, data=b"")])[0], "not a multiple of the block size 32")


def test_bad_type_and_offsets(tmp_path):
    t = {"name": "w", "dims": (4, 2), "type": T_F32}
    data, layout = build_gguf([], [t])
    at = layout["tensors"][0]["type"]
    for tid in (4, 5, 31, 999, 2**32 - 1):
        e = _err(tmp_path, data[:at] + struct.pack("<I", tid) + data[at + 4:], f"unknown ggml type id {tid}")
        assert e.offset == at
    _err(tmp_path, build_gguf([], [dict(t, offset=2**40)])[0], "runs past the end")
    _err(tmp_path, build_gguf([], [dict(t, offset=2**64 - 32)])[0], "runs past the end")
    _err(tmp_path, build_gguf([], [dict(t, offset=4)])[0], "not a multiple of the alignment 32")
    _err(tmp_path, build_gguf([], [t, dict(t, name="v", offset=0)])[0], "overlaps")
    # tensor data claimed past EOF by truncating the data section
    _err(tmp_path, data[:-1], "runs past the end")


def test_bad_alignment(tmp_path):
    _err(tmp_path, build_gguf([("general.alignment", U32, 0)], alignment=32)[0], "power of two")
    _err(tmp_path, build_gguf([("general.alignment", U32, 24)], alignment=32)[0], "power of two")
    _err(tmp_path, build_gguf([("general.alignment", STRING, "32")], alignment=32)[0], "must be an integer")
    _err(tmp_path, build_gguf([("general.alignment", I32, -32)], alignment=32)[0], "power of two")
