"""Offline proof of the Int dequantize kernel (csrc/cuda/int_dequant.cu):

* host emulation of its 4-bit packed fast path, constants and byte selectors
  read from the source: every code of a 32-code chunk lands in the output slot
  of its column, and the half2 / bfloat162 arithmetic (magic-exponent codes,
  exact q - z, one rounding of the product) equals the spec's fp32
  ``(q - z) * s`` rounded to 16 bits, for every code, integral zero point and
  a sweep of scales;
* SASS (sm_90a, slow): no spills, 128-bit loads and stores in the main loop,
  no divergent branch on the fast path, and its instructions per output held
  to what the kernel meets (a bound a later change cannot silently regress).
"""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ops import cuda_sass

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "int_dequant.cu"


def _src() -> str:
    return SOURCE.read_text()


def _magic(tag: str) -> int:
    body = re.search(rf"struct Raw16<{tag}> \{{(.*?)\n\}};", _src(), re.S).group(1)
    return int(re.search(r"kMagic = (0x[0-9a-f]+)u", body).group(1), 16)


def _selectors():
    return [int(x, 16) for x in re.findall(r"int4_pairs_16<Out>\(words\[i\], (0x[0-9a-f]+),", _src())]


def byte_perm(x: int, y: int, s: int) -> int:
    """CUDA __byte_perm: result byte n = byte (s >> 4n) & 7 of the 8 bytes {x, y}."""
    src = x | (y << 32)
    return sum(((src >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << (8 * n) for n in range(4))


def _to16(v: np.ndarray, dtype: str) -> np.ndarray:
    t = torch.from_numpy(np.asarray(v, np.float64))
    return t.to(torch.float16 if dtype == "fp16" else torch.bfloat16).double().numpy()


def _halves(bits: int, dtype: str):
    a = np.array([bits & 0xFFFF, bits >> 16], np.uint16)
    if dtype == "fp16":
        return a.view(np.float16).astype(np.float64)
    return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def emulate_fast_chunk(chunk: bytes, s: float, z: float, dtype: str) -> np.ndarray:
    """The 32 outputs of dequant_chunk's fast path in memory order."""
    words = [int.from_bytes(chunk[4 * i:4 * i + 4], "little") for i in range(4)]
    magic = _magic("__half" if dtype == "fp16" else "__nv_bfloat16")
    base = 1024.0 if dtype == "fp16" else 128.0
    sel_a, sel_b = _selectors()
    slots = [None] * 16  # bits[0..15]: 16 output pairs in memory order
    for i, w in enumerate(words):
        for j, sel in enumerate((sel_a, sel_b)):
            v = byte_perm(w, 0, sel)
            qlo = _halves((v & 0x000F000F) | magic, dtype)
            lo = _to16((qlo - (base + z)) * s, dtype)  # exact difference, one rounding of the product
            if dtype == "fp16":
                qhi = _halves((v & 0x00F000F0) | magic, dtype)  # 1024 + 16 q
                hi = _to16((qhi * (1 / 16) - (64 + z)) * s, dtype)
            else:
                qhi = _halves(((v >> 4) & 0x000F000F) | magic, dtype)
                hi = _to16((qhi - (base + z)) * s, dtype)
            slots[2 * i + j] = lo
            slots[8 + 2 * i + j] = hi
    return np.concatenate(slots)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fast_path_puts_every_code_in_its_column_exactly(dtype):
    from pyquant.formats.int_format import pack_codes

    g = torch.Generator().manual_seed(0)
    tdt = torch.float16 if dtype == "fp16" else torch.bfloat16
    scales = (torch.rand(40, generator=g) * 0.2 + 1e-3).to(tdt).double().tolist() + [6.1e-5, 1.0, 7.5, 0.0]
    for z in range(0, 16):
        codes = torch.randint(0, 16, (1, 32), generator=g, dtype=torch.uint8)
        codes[0, :16] = torch.arange(16)  # every code at least once
        chunk = bytes(pack_codes(codes, 4)[0].tolist())
        for s in scales:
            got = emulate_fast_chunk(chunk, s, float(z), dtype)
            spec = ((codes[0].float() - float(z)) * torch.tensor(s, dtype=torch.float32)).to(tdt).double().numpy()
            np.testing.assert_array_equal(got, spec, err_msg=f"z={z} s={s}")


def test_byte_selectors_pick_adjacent_codes():
    assert _selectors() == [0x4140, 0x4342]
    w = 0x44332211
    assert byte_perm(w, 0, 0x4140) & 0x00FF00FF == 0x00220011
    assert byte_perm(w, 0, 0x4342) & 0x00FF00FF == 0x00440033


# --- SASS (sm_90a) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sass():
    why = cuda_sass.missing_tools()
    if why:
        pytest.skip(why)
    src = "csrc/cuda/int_dequant.cu"
    full = cuda_sass.kernels(src, marker="STG.E.128")
    fast = cuda_sass.kernels(src, marker="STG.E.128", defines=("PYQUANT_DEQUANT_FAST_PATH_ONLY",))
    print("\n" + cuda_sass.table(full, lambda k: 32))
    print("fast path (scales in the output dtype, integral zeros):\n" + cuda_sass.table(fast, lambda k: 32))
    return full, fast


# Instructions per output of the 4-bit fast path: the decode itself is 1.75 (per
# 8 codes: 2 PRMT, 4 LOP3, 4 exact subtractions, 4 packed multiplies); the rest is
# the chunk's load, scale and zero, and address math.
FAST_PATH_BOUND = {"__half": 3.0, "__nv_bfloat16": 3.2}


@pytest.mark.slow
def test_dequantize_sass_bounds(sass):
    full, fast = sass
    for k in full:
        assert k.spill == 0, f"{k.short}: spills"
        mem = k.loop_mem()
        assert any(op.startswith("STG.E.128") for op in mem), f"{k.short}: no 128-bit stores in the main loop"
        assert not any(op.startswith("STG") and op != "STG.E.128" for op in mem), f"{k.short}: narrow stores"
        if ", 4>" in k.short or ", 8>" in k.short:
            assert mem.get("LDG.E.EF.128", 0) >= 1, f"{k.short}: the chunk is not one 128-bit streaming load"
    for k in fast:
        m = re.search(r"<(\w+), 4>", k.short)
        if m and m.group(1) in FAST_PATH_BOUND:
            assert not k.has("BSSY") and not k.has("CALL"), k.short
            per = len(k.loop) / 32
            assert per <= FAST_PATH_BOUND[m.group(1)], f"{k.short}: {per:.2f} instructions per output"
