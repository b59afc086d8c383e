"""Fuzzing GGUFFile: a mutated file either opens and reads or raises FormatError.

Any other exception (IndexError, struct.error, OverflowError, MemoryError,
UnicodeDecodeError, RecursionError, a plain ValueError...) fails, and so does a
hang (hypothesis deadline plus a SIGALRM guard) or memory use out of
proportion to the file (tracemalloc peak).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import struct
import tracemalloc
from datetime import timedelta

import numpy as np
import pytest

from tests.deps import require, smollm2_gguf
import torch

from pyquant import FormatError, QuantizedWeight
from pyquant.io.gguf import GGUFFile

hypothesis = require("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

gguf = require("gguf")

# The hand builder lives with the reader tests; load it by path so this works
# whatever pytest's import mode is.
_spec = importlib.util.spec_from_file_location(
    "_gguf_reader_tests", os.path.join(os.path.dirname(__file__), "test_gguf_reader.py")
)
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

HANG_SECONDS = 20


@contextlib.contextmanager
def hang_guard(seconds=HANG_SECONDS):
    """Turn a hang into a failure (hypothesis' deadline only fires after the call returns)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"GGUFFile took more than {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def open_and_read_all(path):
    """Return None when the file reads cleanly, the FormatError otherwise; anything else propagates."""
    try:
        with GGUFFile(path) as f:
            for name in f.tensor_names():
                info = f.tensor_info(name)
                try:
                    t = f.tensor(name)
                except FormatError:
                    # a known type pyquant cannot hold: the raw bytes must still read
                    t = f.tensor_bytes(name)
                    assert t.numel() == info.nbytes
                    continue
                if isinstance(t, QuantizedWeight):
                    assert t.nbytes == info.nbytes
                else:
                    assert isinstance(t, torch.Tensor) and t.numel() * t.element_size() == info.nbytes
            repr(f.metadata)
        return None
    except FormatError as exc:
        assert str(exc).startswith("GGUF offset 0x"), str(exc)
        return exc


# --- mutations --------------------------------------------------------------------------
U64_VALUES = [0, 1, 7, 8, 12, 13, 32, 255, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63,
              2**64 - 32, 2**64 - 1]
U32_VALUES = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 14, 15, 16, 30, 31, 99, 2**31, 2**32 - 1]


def interesting(width, file_size):
    """Values worth writing into a field of `width` bytes of a file of `file_size` bytes."""
    if width == 8:
        near = [file_size, file_size - 1, file_size + 1, file_size // 2]
        return sorted(set(U64_VALUES + [v % 2**64 for v in near]))
    if width == 4:
        return U32_VALUES
    return [0, 1, 2, 127, 128, 255][: 1 << (8 * width)] if width == 1 else [0, 1, 2**(8 * width) - 1]


@st.composite
def mutations(draw, base: bytes, hot, fields=()):
    """A list of (kind, position, argument) edits. Positions favour field starts (`hot`);
    "field" edits write an interesting value of the right width into a known field."""
    n = draw(st.integers(1, 4))
    out = []
    kinds = ["flip", "u64", "u32", "truncate", "insert", "delete", "u8"]
    for _ in range(n):
        if fields and draw(st.booleans()):
            pos, width, _ = draw(st.sampled_from(fields))
            value = draw(st.sampled_from(interesting(width, len(base))))
            out.append(("field", pos, value.to_bytes(width, "little")))
            continue
        kind = draw(st.sampled_from(kinds))
        pos = draw(st.one_of(st.sampled_from(hot), st.integers(0, len(base))))
        if kind == "flip":
            arg = draw(st.integers(1, 255))
        elif kind == "u64":
            arg = draw(st.one_of(st.sampled_from(U64_VALUES), st.integers(0, 2**64 - 1),
                                 st.integers(-(2**20), 2**20).map(lambda v: v % 2**64)))
        elif kind == "u32":
            arg = draw(st.one_of(st.sampled_from(U32_VALUES), st.integers(0, 2**32 - 1)))
        elif kind == "u8":
            arg = draw(st.integers(0, 255))
        elif kind == "insert":
            arg = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            arg = draw(st.integers(1, 16))
        else:
            arg = None
        out.append((kind, pos, arg))
    return out


def apply(base: bytes, muts) -> bytes:
    data = bytearray(base)
    for kind, pos, arg in muts:
        pos = min(pos, len(data))
        if kind == "flip":
            if pos < len(data):
                data[pos] ^= arg
        elif kind == "u8":
            data[pos:pos + 1] = bytes([arg])
        elif kind == "field":
            data[pos:pos + len(arg)] = arg
        elif kind == "u64":
            data[pos:pos + 8] = struct.pack("<Q", arg)
        elif kind == "u32":
            data[pos:pos + 4] = struct.pack("<I", arg)
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = arg
        elif kind == "delete":
            del data[pos:pos + arg]
    return bytes(data)


def hot_positions(layout):
    hot = [0, 4, layout["tensor_count"], layout["kv_count"], layout["data_start"]]
    for rec in layout["kv"] + layout["tensors"]:
        hot.extend(v for v in rec.values())
    return sorted(set(hot))


# --- the small synthetic file -----------------------------------------------------------
def small_files():
    tensors = R.mixed_tensors() + [{"name": "iq", "dims": (256, 1), "type": R.T_IQ2_XXS}]
    v3 = R.build_gguf(R.ALL_KVS, tensors, version=3, alignment=32)
    v2 = R.build_gguf(R.ALL_KVS[:6] + R.ALL_KVS[-3:], tensors[:4], version=2, alignment=8)
    return [(data, hot_positions(layout), layout["fields"]) for data, layout in (v3, v2)]


SMALL = small_files()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf_fuzz")


def test_small_files_are_valid(workdir):
    for i, (data, _, _) in enumerate(SMALL):
        path = str(workdir / f"valid{i}.gguf")
        with open(path, "wb") as fh:
            fh.write(data)
        assert open_and_read_all(path) is None


@pytest.mark.parametrize("which", range(len(SMALL)))
def test_every_field_every_value(workdir, which):
    """Systematic: each known field of the small files set to each interesting value."""
    base, _, fields = SMALL[which]
    path = str(workdir / f"field{which}.gguf")
    for pos, width, what in fields:
        for value in interesting(width, len(base)):
            blob = base[:pos] + value.to_bytes(width, "little") + base[pos + width:]
            with open(path, "wb") as fh:
                fh.write(blob)
            with hang_guard():
                try:
                    open_and_read_all(path)
                except Exception as exc:
                    raise AssertionError(f"{what} (offset {pos}) = {value}: {exc!r}") from exc


@settings(max_examples=300, deadline=timedelta(seconds=5), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_small(workdir, data):
    which = data.draw(st.integers(0, len(SMALL) - 1), label="file")
    base, hot, fields = SMALL[which]
    muts = data.draw(mutations(base, hot, fields), label="mutations")
    blob = apply(base, muts)
    path = str(workdir / "small.gguf")
    with open(path, "wb") as fh:
        fh.write(blob)
    tracemalloc.start()
    try:
        with hang_guard():
            open_and_read_all(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Python objects cost a small constant factor over the bytes that encode them
    # (a list slot per 1-byte bool); anything sized by an unchecked count would blow this.
    assert peak <= 16 * len(blob) + (1 << 20), f"peak {peak} bytes for a {len(blob)}-byte file"


# --- the real file's header region --------------------------------------------------------
PREFIX_BYTES = 2 << 20


@pytest.fixture(scope="module")
def real_prefix(workdir):
    path = smollm2_gguf()
    with open(path, "rb") as fh:
        prefix = fh.read(PREFIX_BYTES)
    ref = gguf.GGUFReader(path)
    hot = {0, 4, 8, 16}
    for field in list(ref.fields.values()) + [t.field for t in ref.tensors]:
        if field.offset < 0 or field.name.startswith("GGUF."):
            continue
        pos = field.offset
        for i, part in enumerate(field.parts):
            if i < 8 or i >= len(field.parts) - 2:
                hot.add(pos)
            pos += part.nbytes
    hot.add(ref.data_offset)
    return prefix, sorted(p for p in hot if p <= len(prefix))


def test_real_prefix_is_rejected_cleanly(workdir, real_prefix):
    prefix, hot = real_prefix
    path = str(workdir / "prefix.gguf")
    with open(path, "wb") as fh:
        fh.write(prefix)
    err = open_and_read_all(path)
    assert err is not None and "runs past the end" in str(err)


def test_real_prefix_truncated_at_field_starts(workdir, real_prefix):
    prefix, hot = real_prefix
    path = str(workdir / "prefix_cut.gguf")
    picks = hot[:: max(1, len(hot) // 40)]
    for n in picks:
        for cut in (n, n + 1, n + 5):
            with open(path, "wb") as fh:
                fh.write(prefix[:cut])
            with hang_guard():
                assert open_and_read_all(path) is not None


@settings(max_examples=60, deadline=timedelta(seconds=8), database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_real_prefix(workdir, real_prefix, data):
    prefix, hot = real_prefix
    blob = apply(prefix, data.draw(mutations(prefix, hot), label="mutations"))
    path = str(workdir / "prefix_mut.gguf")
    with open(path, "wb") as fh:
        fh.write(blob)
    with hang_guard():
        open_and_read_all(path)
