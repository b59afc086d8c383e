"""GGUF block formats: the pure-torch reference decoders and the legacy RTN
quantizers, bit-exact against gguf-py (``gguf.quants``)."""
import struct

import pytest

from tests.deps import require
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyquant
from tests.gguf_testutil import (
    ALL_TYPES,
    FP16_FIELDS,
    LEGACY_TYPES,
    assert_bitexact,
    gguf_dequantize_np,
    gguf_quantize_np,
    random_blocks,
    set_fp16,
)
from pyquant.algorithms.rtn_gguf import legacy_fields, rtn_gguf
from pyquant.formats import GGUF, QuantizedWeight
from pyquant.formats.gguf import BLOCK_TYPES
from pyquant.formats.gguf_blocks import (
    k4_scale_min,
    pack_k4_scales,
    pack_legacy_blocks,
    unpack_legacy_blocks,
)

gguf = require("gguf")

# Largest block magnitude whose fp16 d (and m) stays finite, per legacy type.
LARGE = {"Q4_0": 4.0e5, "Q5_0": 8.0e5, "Q4_1": 3.0e4, "Q5_1": 3.0e4, "Q8_0": 8.0e6}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _weight_blocks(type_name, n, k, gen, **kw):
    nb = k // BLOCK_TYPES[type_name].block_size
    return random_blocks(type_name, n * nb, gen, **kw).reshape(n, nb * BLOCK_TYPES[type_name].type_size)


def _check_dequant(type_name, blocks, shape, what=""):
    ours = GGUF(type_name).decode({"blocks": blocks}, shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == tuple(shape)
    ref = gguf_dequantize_np(type_name, blocks).reshape(shape)
    assert_bitexact(ours, ref, f"{type_name} {what}")


# --- dequantization -------------------------------------------------------------
@pytest.mark.parametrize("type_name", ALL_TYPES)
@pytest.mark.parametrize("blocks_per_row,rows", [(1, 1), (3, 1), (2, 5), (8, 40)])
def test_dequant_random_blocks_bitexact(type_name, blocks_per_row, rows):
    k = blocks_per_row * BLOCK_TYPES[type_name].block_size
    blocks = _weight_blocks(type_name, rows, k, _gen(rows * 100 + blocks_per_row))
    _check_dequant(type_name, blocks, (rows, k), f"({rows}, {k})")


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_dequant_through_public_op(type_name):
    k = 2 * BLOCK_TYPES[type_name].block_size
    blocks = _weight_blocks(type_name, 3, k, _gen(7))
    qw = QuantizedWeight(GGUF(type_name), {"blocks": blocks}, (3, k))
    ref = gguf_dequantize_np(type_name, blocks).reshape(3, k)
    assert_bitexact(pyquant.dequantize(qw, kernel="reference"), ref, type_name)
    assert_bitexact(pyquant.dequantize(qw), ref, f"{type_name} auto")


# fp16 bit patterns: zeros of both signs, smallest/largest subnormals, smallest
# normal, ordinary values of both signs, the largest finite values.
SPECIAL_FP16 = (0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x3C00, 0xBC00,
                0x3555, 0xC2AB, 0x7BFF, 0xFBFF)
CODE_BYTES = (0x00, 0xFF, 0xAA, 0x55, 0x0F, 0xF0, 0x80, 0x7F)


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_dequant_special_values(type_name):
    ts = BLOCK_TYPES[type_name].type_size
    nf = len(FP16_FIELDS[type_name])
    rows = []
    for code in CODE_BYTES:
        for i, a in enumerate(SPECIAL_FP16):
            b = torch.full((1, ts), code, dtype=torch.uint8)
            set_fp16(b, type_name, 0, a)
            if nf == 2:  # pair each d with every other min pattern, cyclically
                set_fp16(b, type_name, 1, SPECIAL_FP16[(i * 5 + 3) % len(SPECIAL_FP16)])
            rows.append(b)
    # All-zero blocks and blocks whose only nonzero bytes are the scales.
    rows.append(torch.zeros((1, ts), dtype=torch.uint8))
    b = torch.zeros((1, ts), dtype=torch.uint8)
    for f in range(nf):
        set_fp16(b, type_name, f, 0x3C00)
    rows.append(b)
    blocks = torch.cat(rows)
    _check_dequant(type_name, blocks, (blocks.shape[0], BLOCK_TYPES[type_name].block_size), "special")


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_dequant_extreme_codes_known_values(type_name):
    """Hand-derived values (independent of gguf-py) for all-max / all-min codes
    with d = 1 (and min/dmin = 0 or 1)."""
    ts = BLOCK_TYPES[type_name].type_size
    bs = BLOCK_TYPES[type_name].block_size
    hi = torch.full((1, ts), 0xFF, dtype=torch.uint8)
    lo = torch.zeros((1, ts), dtype=torch.uint8)
    for b in (hi, lo):
        set_fp16(b, type_name, 0, 1.0)
        if len(FP16_FIELDS[type_name]) == 2:
            set_fp16(b, type_name, 1, 1.0 if type_name in ("Q4_1", "Q5_1") else 0.0)
    expect_hi = {"Q4_0": 7.0, "Q4_1": 16.0, "Q5_0": 15.0, "Q5_1": 32.0, "Q8_0": -1.0,
                 "Q2_K": 15.0 * 3, "Q3_K": 31.0 * 3, "Q4_K": 63.0 * 15, "Q5_K": 63.0 * 31, "Q6_K": -1.0 * 31}
    expect_lo = {"Q4_0": -8.0, "Q4_1": 1.0, "Q5_0": -16.0, "Q5_1": 1.0, "Q8_0": 0.0,
                 "Q2_K": 0.0, "Q3_K": (-32.0) * (-4), "Q4_K": 0.0, "Q5_K": 0.0, "Q6_K": 0.0}
    for b, expect in ((hi, expect_hi), (lo, expect_lo)):
        out = GGUF(type_name).dequantize({"blocks": b}, (1, bs))
        assert torch.all(out == expect[type_name]), (type_name, out.unique())


@pytest.mark.parametrize("type_name", ALL_TYPES)
@pytest.mark.parametrize("field", [0, 1])
def test_dequant_single_element_positions(type_name, field):
    """Set one code byte to a distinct pattern per block; every byte position
    of the layout is exercised once (catches permuted layouts that uniformly
    random blocks could hide only by luck)."""
    ts = BLOCK_TYPES[type_name].type_size
    f16 = {o + j for o in FP16_FIELDS[type_name] for j in (0, 1)}
    pos = [p for p in range(ts) if p not in f16]
    blocks = torch.zeros((len(pos), ts), dtype=torch.uint8)
    for i, p in enumerate(pos):
        blocks[i, p] = 0x5A if field == 0 else 0xC3
    for f in range(len(FP16_FIELDS[type_name])):
        set_fp16(blocks, type_name, f, 1.5 if f == 0 else 0.25)
    _check_dequant(type_name, blocks, (len(pos), BLOCK_TYPES[type_name].block_size), "positions")


def test_k4_scale_min_roundtrip():
    g = _gen(3)
    sc = torch.randint(0, 64, (50, 8), generator=g)
    mn = torch.randint(0, 64, (50, 8), generator=g)
    packed = pack_k4_scales(sc, mn)
    assert int(packed.max()) < 256
    s2, m2 = k4_scale_min(packed)
    assert torch.equal(s2, sc.to(torch.int32)) and torch.equal(m2, mn.to(torch.int32))


@pytest.mark.parametrize("type_name", LEGACY_TYPES)
def test_legacy_unpack_pack_roundtrip(type_name):
    blocks = random_blocks(type_name, 300, _gen(11))
    d, m, codes = unpack_legacy_blocks(type_name, blocks)
    again = pack_legacy_blocks(type_name, d.view(1, -1), None if m is None else m.view(1, -1),
                               codes.reshape(1, -1))
    assert torch.equal(again.view(300, -1), blocks)


def test_legacy_layout_by_hand():
    """One Q5_1 block packed by hand with struct: fields in documented order."""
    codes = list(range(32))
    qh = sum(((c >> 4) & 1) << j for j, c in enumerate(codes))
    qs = bytes((codes[j] & 15) | ((codes[j + 16] & 15) << 4) for j in range(16))
    raw = struct.pack("<eeI", 0.5, -2.0, qh) + qs
    d = torch.tensor([[0.5]], dtype=torch.float16)
    m = torch.tensor([[-2.0]], dtype=torch.float16)
    packed = pack_legacy_blocks("Q5_1", d, m, torch.tensor([codes]))
    assert bytes(packed.view(-1).tolist()) == raw
    out = GGUF("Q5_1").dequantize({"blocks": packed}, (1, 32))
    assert torch.equal(out, torch.tensor([codes], dtype=torch.float32) * 0.5 - 2.0)


# --- legacy RTN quantizers --------------------------------------------------------
def _check_quant(type_name, w, what=""):
    ref = gguf_quantize_np(type_name, w)
    qw = rtn_gguf(w, GGUF(type_name))
    assert_bitexact(qw.tensors["blocks"], ref, f"{type_name} bytes {what}")
    return qw


@pytest.mark.parametrize("type_name", LEGACY_TYPES)
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (17, 256)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_rtn_random_bytes_match_gguf(type_name, shape, scale):
    w = torch.randn(shape, generator=_gen(shape[0] * shape[1])) * scale
    _check_quant(type_name, w, f"{shape} x{scale}")


def _tie_blocks(type_name):
    """Blocks on which w / d lands exactly on .5 (and on integers): d is a power
    of two, so every product below is exact and the rounding rule decides."""
    idx = torch.arange(32, dtype=torch.float32)
    rows = []
    if type_name in ("Q4_0", "Q5_0"):
        lv = 8.0 if type_name == "Q4_0" else 16.0
        for sign in (-1.0, 1.0):
            b = idx % (2 * lv) - lv + 0.5
            b[5] = sign * lv  # the signed max: d = -sign
            rows.append(b)
            b2 = idx % (2 * lv) - lv
            b2[0] = sign * lv
            rows.append(b2)
    elif type_name in ("Q4_1", "Q5_1"):
        steps = 15.0 if type_name == "Q4_1" else 31.0
        b = idx % steps + 0.5
        b[0], b[1] = 0.0, steps  # min 0, max = steps: d = 1
        rows.append(b)
        rows.append(b - 7.0)
        b = idx % (steps + 1)
        rows.append(b)
    else:
        b = (idx - 16) * 4.0 + 0.5
        b[0] = 127.0
        rows.append(b)
        rows.append(-b)
        b = (idx - 16) * 7.0 - 0.5
        b[3] = -127.0
        rows.append(b)
    rows = torch.stack(rows)
    return torch.cat([rows * 2.0**e for e in (-20, -3, 0, 4)])


def _adversarial(type_name):
    g = _gen(5)
    big = LARGE[type_name]
    rows = {
        "zeros": torch.zeros(2, 64),
        "neg zeros": torch.full((2, 64), -0.0),
        "mixed zero signs": torch.tensor([0.0, -0.0] * 32).repeat(2, 1),
        "constant +": torch.full((2, 64), 0.7),
        "constant -": torch.full((2, 64), -0.7),
        "constant pow2": torch.full((1, 64), 2.0),
        "one nonzero": torch.zeros(1, 64).index_fill_(1, torch.tensor([9]), -3.0),
        "abs ties +-": torch.tensor([3.0, -3.0] + [1.0] * 30 + [-3.0, 3.0] + [0.5] * 30).view(1, 64),
        "ties": _tie_blocks(type_name),
        "large": torch.randn(3, 64, generator=g) * (big / 4),
        "at the fp16 limit": torch.full((1, 32), big),
        "one huge outlier": torch.randn(4, 64, generator=g).index_fill_(1, torch.tensor([17]), big),
        "fp16-subnormal d": torch.randn(2, 64, generator=g) * 1e-6,
        "underflowing d": torch.randn(2, 64, generator=g) * 1e-9,
        "fp32 subnormal weights": torch.randn(2, 64, generator=g) * 1e-40,
        "tiny range, big offset": 1000.0 + torch.randn(2, 64, generator=g) * 1e-4,
    }
    return rows


@pytest.mark.parametrize("type_name", LEGACY_TYPES)
def test_rtn_adversarial_bytes_match_gguf(type_name):
    for what, w in _adversarial(type_name).items():
        if w.shape[1] % 32:
            continue
        _check_quant(type_name, w.contiguous(), what)


@pytest.mark.parametrize("type_name", LEGACY_TYPES)
def test_quantize_weight_roundtrip_matches_gguf(type_name):
    g = _gen(21)
    w = torch.randn(9, 128, generator=g)
    w[2, 40] = 25.0
    w[4] = 0.0
    qw = pyquant.quantize_weight(w, GGUF(type_name))
    assert isinstance(qw, QuantizedWeight) and qw.shape == (9, 128)
    ref_bytes = gguf_quantize_np(type_name, w)
    assert_bitexact(qw.tensors["blocks"], ref_bytes, f"{type_name} bytes")
    assert_bitexact(pyquant.dequantize(qw), gguf_dequantize_np(type_name, ref_bytes), f"{type_name} dequant")
    # Quantization error is bounded by the step (half a step for round-to-nearest).
    err = (pyquant.dequantize(qw) - w).abs().amax().item()
    assert err < 25.0 / {"Q4_0": 7, "Q4_1": 14, "Q5_0": 15, "Q5_1": 30, "Q8_0": 120}[type_name]


def test_quantize_weight_half_precision_input():
    w = (torch.randn(4, 64, generator=_gen(2)) * 3).to(torch.float16)
    qw = pyquant.quantize_weight(w, GGUF("Q4_0"))
    assert_bitexact(qw.tensors["blocks"], gguf_quantize_np("Q4_0", w.float()), "fp16 input")


def test_legacy_fields_are_stored_values():
    w = torch.randn(2, 64, generator=_gen(4))
    d, m, codes = legacy_fields(w, "Q4_1")
    assert d.dtype == torch.float16 and m.dtype == torch.float16 and d.shape == (2, 2)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert torch.equal(m.float(), w.view(2, 2, 32).amin(-1).half().float())


@pytest.mark.parametrize("type_name,value", [("Q4_0", 6e5), ("Q5_0", 1.1e6), ("Q8_0", -9e6),
                                             ("Q4_1", 2e6), ("Q5_1", -7e4)])
def test_rtn_fp16_overflow_raises(type_name, value):
    """gguf-py stores an Inf scale/min here (checked below); we refuse instead."""
    w = torch.randn(2, 64, generator=_gen(8))
    w[1, 40] = value
    ref = gguf_quantize_np(type_name, w).view(2, 2, -1)
    halves = [ref[1, 1, o : o + 2].clone().view(torch.float16) for o in FP16_FIELDS[type_name]]
    assert any(torch.isinf(h).any() for h in halves)
    with pytest.raises(pyquant.ValueRangeError, match=r"block 3 \(row 1, columns 32..63\)"):
        pyquant.quantize_weight(w, GGUF(type_name))


# --- bad input --------------------------------------------------------------------
@pytest.mark.parametrize("type_name,k", [("Q4_0", 48), ("Q8_0", 33), ("Q4_K", 128), ("Q6_K", 300)])
def test_k_not_divisible(type_name, k):
    with pytest.raises(pyquant.ShapeError, match="block size"):
        pyquant.quantize_weight(torch.randn(2, k), GGUF(type_name))
    with pytest.raises(pyquant.ShapeError, match="block size"):
        GGUF(type_name).dequantize({"blocks": torch.zeros((2, 1000), dtype=torch.uint8)}, (2, k))


@pytest.mark.parametrize("type_name", ["Q4_1", "Q3_K"])
def test_wrong_blocks_tensor(type_name):
    bt = BLOCK_TYPES[type_name]
    k = 2 * bt.block_size
    good = (3, 2 * bt.type_size)
    for bad in [(3, 2 * bt.type_size - 1), (3, 2 * bt.type_size + 2), (2, 2 * bt.type_size), (3 * 2 * bt.type_size,)]:
        t = torch.zeros(bad, dtype=torch.uint8)
        with pytest.raises(pyquant.ShapeError, match=str(good)):
            QuantizedWeight(GGUF(type_name), {"blocks": t}, (3, k))
        with pytest.raises(pyquant.ShapeError, match="must be"):
            GGUF(type_name).dequantize({"blocks": t}, (3, k))
    with pytest.raises(pyquant.DtypeError):
        QuantizedWeight(GGUF(type_name), {"blocks": torch.zeros(good, dtype=torch.int8)}, (3, k))
    with pytest.raises(pyquant.DtypeError):
        GGUF(type_name).dequantize({"blocks": torch.zeros(good, dtype=torch.int16)}, (3, k))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weight(bad):
    w = torch.randn(2, 64)
    w[1, 7] = bad
    with pytest.raises(pyquant.ValueRangeError, match="NaN or Inf"):
        pyquant.quantize_weight(w, GGUF("Q4_0"))


def test_pack_legacy_blocks_bad_args():
    d = torch.ones(2, 2, dtype=torch.float16)
    codes = torch.zeros(2, 64, dtype=torch.int32)
    with pytest.raises(pyquant.FormatError):
        pack_legacy_blocks("Q4_K", d, None, codes)
    with pytest.raises(pyquant.FormatError):
        pack_legacy_blocks("Q4_1", d, None, codes)
    with pytest.raises(pyquant.ShapeError):
        pack_legacy_blocks("Q4_0", d, None, codes[:, :48])
    with pytest.raises(pyquant.ShapeError):
        pack_legacy_blocks("Q4_0", d[:1], None, codes)


# --- property tests ---------------------------------------------------------------
_finite_f16 = st.floats(width=16, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), type_name=st.sampled_from(ALL_TYPES), nb=st.integers(1, 3), rows=st.integers(1, 2))
def test_property_random_bytes_bitexact(data, type_name, nb, rows):
    bt = BLOCK_TYPES[type_name]
    raw = data.draw(st.binary(min_size=rows * nb * bt.type_size, max_size=rows * nb * bt.type_size))
    blocks = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone().view(rows * nb, bt.type_size)
    for f in range(len(FP16_FIELDS[type_name])):
        vals = data.draw(st.lists(_finite_f16, min_size=rows * nb, max_size=rows * nb))
        set_fp16(blocks, type_name, f, torch.tensor(vals, dtype=torch.float16).view(torch.int16).to(torch.int32))
    blocks = blocks.view(rows, nb * bt.type_size)
    _check_dequant(type_name, blocks, (rows, nb * bt.block_size), "hypothesis")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), type_name=st.sampled_from(LEGACY_TYPES), rows=st.integers(1, 2), nb=st.integers(1, 2))
def test_property_rtn_bytes_match_gguf(data, type_name, rows, nb):
    # Magnitudes kept where every fp16 scale/min is finite for all five types.
    vals = data.draw(st.lists(st.floats(-3.0e4, 3.0e4, width=32), min_size=rows * nb * 32, max_size=rows * nb * 32))
    w = torch.tensor(vals, dtype=torch.float32).view(rows, nb * 32)
    _check_quant(type_name, w, "hypothesis")


# --- devices ----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_cuda_matches_cpu(type_name):
    bt = BLOCK_TYPES[type_name]
    blocks = _weight_blocks(type_name, 64, 4 * bt.block_size, _gen(31))
    shape = (64, 4 * bt.block_size)
    cpu = GGUF(type_name).dequantize({"blocks": blocks}, shape)
    gpu = GGUF(type_name).dequantize({"blocks": blocks.cuda()}, shape)
    assert gpu.is_cuda
    assert_bitexact(gpu, cpu, f"{type_name} cuda dequant")
    if type_name in LEGACY_TYPES:
        for w in (torch.randn(64, 256, generator=_gen(32)), _tie_blocks(type_name)):
            assert_bitexact(rtn_gguf(w.cuda(), GGUF(type_name)).tensors["blocks"].cpu(),
                            gguf_quantize_np(type_name, w), f"{type_name} cuda rtn")
