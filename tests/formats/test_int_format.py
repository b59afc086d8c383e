"""Int format: layout spec, RTN quantizer, state dicts, bad input."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyquant
from pyquant.formats import Int, QuantizedWeight, format_from_spec
from pyquant.formats.int_format import pack_codes, unpack_codes

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, 256, -1)


def codes_by_bit_formula(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Independent, loop-based reading of the documented layout (not vectorised
    like pack_codes), so the two implementations check each other."""
    out = torch.zeros((packed.shape[0], k), dtype=torch.uint8)
    for n in range(packed.shape[0]):
        row = packed[n].tolist()
        for j in range(k):
            chunk, i = divmod(j, 32)
            if bits == 8:
                v = row[j]
            elif bits == 4:
                b = row[chunk * 16 + (i % 16)]
                v = (b & 15) if i < 16 else (b >> 4)
            elif bits == 2:
                v = (row[chunk * 8 + (i % 8)] >> (2 * (i // 8))) & 3
            else:
                base = chunk * 12
                lo = (row[base + (i % 8)] >> (2 * (i // 8))) & 3
                word = sum(row[base + 8 + t] << (8 * t) for t in range(4))
                v = lo | (((word >> i) & 1) << 2)
            out[n, j] = v
    return out


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [1, 31, 32, 33, 100])
def test_pack_layout_matches_documented_bits(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (3, k), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, math.ceil(k / 32) * 32 * bits // 8)
    assert torch.equal(codes_by_bit_formula(packed, bits, k), codes)
    assert torch.equal(unpack_codes(packed, bits, k), codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), n=st.integers(1, 5), k=st.integers(1, 130), seed=st.integers(0, 2**31))
def test_pack_unpack_roundtrip_property(bits, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    assert torch.equal(pyquant.unpack(Int(bits, 32, True).pack(codes, torch.ones(n, math.ceil(k / 32)))), codes)


def test_spec_roundtrip():
    for bits in BITS:
        for gs in GROUPS:
            for sym in (True, False):
                for dt in (torch.float16, torch.bfloat16, torch.float32):
                    for ao in (False, True):
                        f = Int(bits, gs, sym, dt, ao)
                        assert format_from_spec(f.spec()) == f


def _sqnr(a, b):
    return float(20 * torch.log10(a.norm() / (a - b).norm()))


# RTN's SQNR (dB) on torch.manual_seed(0); torch.randn(48, 576), measured, per
# (bits, symmetric), for group sizes 32, 64, 128, 256 and per channel (GROUPS
# order). Each step down in group size buys 0.37-1.04 dB, so a floor 0.25 dB
# under the measured value fails a quantizer that ignores the group size.
RTN_SQNR_DB = {
    (2, True): (3.64, 2.86, 2.32, 1.94, 1.44),  # levels {-2, -1, 0, 1} * absmax: poor by design
    (2, False): (7.77, 6.81, 6.03, 5.35, 4.56),
    (3, True): (12.90, 11.99, 11.27, 10.72, 9.93),
    (3, False): (15.23, 14.24, 13.42, 12.72, 11.88),
    (4, True): (20.30, 19.36, 18.65, 18.08, 17.29),
    (4, False): (21.82, 20.84, 20.04, 19.32, 18.51),
    (8, True): (45.46, 44.54, 43.83, 43.25, 42.45),
    (8, False): (46.49, 45.45, 44.62, 43.94, 43.10),
}
SQNR_MARGIN_DB = 0.25


def _rtn_weight():
    torch.manual_seed(0)
    return torch.randn(48, 576)  # 576 = 4.5 groups of 128: a ragged last group


def _group_of_each_column(fmt, k):
    return torch.arange(k) // fmt.group_size_for(k)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_accuracy_and_ragged_groups(bits, group, sym):
    w = _rtn_weight()
    fmt = Int(bits, group, sym)
    qw = pyquant.quantize_weight(w, fmt)
    w_hat = qw.dequantize(torch.float32)
    assert w_hat.shape == w.shape
    codes, scales, zeros = fmt.unpack(qw)
    assert int(codes.max()) < 2**bits
    # Every reconstructed value is (code - zero) * scale of ITS group (column k
    # belongs to group k // group_size; the ragged last group included) ...
    col_group = _group_of_each_column(fmt, w.shape[1])
    s, z = scales.float()[:, col_group], zeros.float()[:, col_group]
    assert torch.equal(w_hat, (codes.float() - z) * s)
    # ... and the grid point of its group nearest to the weight (round to nearest):
    # no other code of that group comes closer.
    levels = (torch.arange(2**bits, dtype=torch.float32) - z.unsqueeze(-1)) * s.unsqueeze(-1)
    nearest = (w.unsqueeze(-1) - levels).abs().min(-1).values
    excess_steps = ((w - w_hat).abs() - nearest) / s  # in grid steps; float noise only
    worst = int(excess_steps.argmax())
    assert float(excess_steps.max()) <= 1e-5, (
        f"weight {tuple(divmod(worst, w.shape[1]))} = {float(w.flatten()[worst]):.6g} came back as "
        f"{float(w_hat.flatten()[worst]):.6g}, {float(excess_steps.max()):.3g} steps farther than "
        "its group's nearest grid point"
    )
    floor = RTN_SQNR_DB[(bits, sym)][GROUPS.index(group)] - SQNR_MARGIN_DB
    assert _sqnr(w, w_hat) > floor, f"SQNR {_sqnr(w, w_hat):.2f} dB <= {floor:.2f} for int{bits} g{group} sym={sym}"


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_smaller_groups_raise_sqnr(bits, sym):
    # Same weight, groups 32 < 64 < 128 < 256 < per channel: each step down in
    # group size must buy accuracy (measured gains are 0.37-1.04 dB).
    w = _rtn_weight()
    sqnrs = [_sqnr(w, pyquant.quantize_weight(w, Int(bits, g, sym)).dequantize()) for g in GROUPS]
    gains = [finer - coarser for finer, coarser in zip(sqnrs, sqnrs[1:])]
    assert min(gains) > 0.2, f"int{bits} sym={sym}: SQNR by group {dict(zip(GROUPS, [round(v, 2) for v in sqnrs]))}"


def test_rtn_is_exact_on_grid_values():
    # Weights that are exactly representable come back exactly (per group).
    torch.manual_seed(1)
    n, k, g = 8, 96, 32
    scales = torch.rand(n, k // g) + 0.5
    scales = scales.half().float()
    codes = torch.randint(0, 16, (n, k))
    codes[:, ::g] = 0
    codes[:, 1::g] = 15
    zeros = torch.full((n, k // g), 3.0)
    w = (codes.float() - zeros.repeat_interleave(g, 1)) * scales.repeat_interleave(g, 1)
    qw = pyquant.quantize_weight(w, Int(4, g, False))
    assert torch.allclose(qw.dequantize(), w, atol=1e-5 * float(w.abs().max()))


def test_ragged_group_uses_only_its_columns():
    # A last group of 1 column with a large value must not affect earlier groups.
    w = torch.ones(2, 129) * 0.01
    w[:, 128] = 100.0
    qw = pyquant.quantize_weight(w, Int(4, 128, False))
    assert torch.allclose(qw.dequantize()[:, :128], w[:, :128], rtol=0.07)
    assert torch.allclose(qw.dequantize()[:, 128], w[:, 128], rtol=0.01)


def test_constant_and_zero_rows():
    w = torch.zeros(3, 64)
    w[1] = 0.5
    w[2] = -2.0
    for sym in (True, False):
        qw = pyquant.quantize_weight(w, Int(4, 32, sym))
        assert torch.allclose(qw.dequantize(), w, atol=1e-3)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32])
def test_scale_dtypes(dt):
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    qw = pyquant.quantize_weight(w, Int(4, 32, False, dt))
    assert qw.tensors["scales"].dtype == dt and qw.tensors["zeros"].dtype == dt
    assert _sqnr(w, qw.dequantize()) > 18


def test_fp16_scale_overflow_is_an_error():
    w = torch.full((2, 32), 1e6)
    w[0, 0] = -1e6
    with pytest.raises(pyquant.ValueRangeError, match="overflows"):
        pyquant.quantize_weight(w, Int(4, 32, False, torch.float16))
    qw = pyquant.quantize_weight(w, Int(4, 32, False, torch.float32))
    assert torch.allclose(qw.dequantize(), w, atol=2e6 / 15)  # within one step of its group


def test_state_dict_roundtrip_and_bits_per_weight():
    torch.manual_seed(3)
    w = torch.randn(10, 100)
    qw = pyquant.quantize_weight(w, Int(3, 64, False, torch.bfloat16))
    sd = qw.state_dict("layer.")
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    back = QuantizedWeight.from_state_dict(sd, "layer.")
    assert back.format == qw.format and back.shape == qw.shape
    assert torch.equal(back.dequantize(), qw.dequantize())
    # 3 bits per code (K padded to 128) + bf16 scale and zero per 64 columns
    assert qw.nbytes == 10 * (128 * 3 // 8) + 2 * 10 * 2 * 2
    assert qw.bits_per_weight == pytest.approx(qw.nbytes * 8 / 1000)


def test_act_order_permutation():
    torch.manual_seed(4)
    n, k = 6, 64
    w = torch.randn(n, k)
    perm = torch.randperm(k)
    base = pyquant.quantize_weight(w[:, perm], Int(4, 32, False))
    fmt = Int(4, 32, False, act_order=True)
    codes, scales, zeros = base.format.unpack(base)
    qw = fmt.pack(codes, scales, zeros, perm=perm)
    w_hat = qw.dequantize()
    assert torch.equal(w_hat[:, perm], base.dequantize())
    x = torch.randn(3, k)
    assert torch.allclose(pyquant.qmatmul(x, qw), x @ w_hat.T, atol=1e-4)


# --- bad input ---------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=5), "bits must be one of"),
        (dict(bits=1), "bits must be one of"),
        (dict(group_size=48), "group_size must be one of"),
        (dict(group_size=0), "group_size must be one of"),
        (dict(scale_dtype=torch.int8), "scale_dtype"),
    ],
)
def test_bad_format_parameters(kwargs, match):
    with pytest.raises((pyquant.FormatError, pyquant.DtypeError), match=match):
        Int(**kwargs)


def test_bad_weights():
    fmt = Int(4, 32)
    with pytest.raises(pyquant.DtypeError, match="int64"):
        pyquant.quantize_weight(torch.ones(4, 32, dtype=torch.int64), fmt)
    with pytest.raises(pyquant.ShapeError, match=r"\(32,\)"):
        pyquant.quantize_weight(torch.ones(32), fmt)
    with pytest.raises(pyquant.ShapeError, match="empty"):
        pyquant.quantize_weight(torch.ones(0, 32), fmt)
    w = torch.ones(4, 32)
    w[2, 7] = float("nan")
    with pytest.raises(pyquant.ValueRangeError, match=r"\(2, 7\)"):
        pyquant.quantize_weight(w, fmt)
    w[2, 7] = float("inf")
    with pytest.raises(pyquant.ValueRangeError, match="Inf"):
        pyquant.quantize_weight(w, fmt)
    with pytest.raises(pyquant.FormatError, match="Format"):
        pyquant.quantize_weight(torch.ones(4, 32), "int4")


def test_packed_tensors_must_match_format():
    qw = pyquant.quantize_weight(torch.randn(4, 64), Int(4, 32))
    t = dict(qw.tensors)
    bad = dict(t, qweight=t["qweight"][:, :-1])
    with pytest.raises(pyquant.ShapeError, match="qweight"):
        QuantizedWeight(qw.format, bad, qw.shape)
    bad = dict(t, scales=t["scales"].float())
    with pytest.raises(pyquant.DtypeError, match="scales"):
        QuantizedWeight(qw.format, bad, qw.shape)
    bad = {k: v for k, v in t.items() if k != "zeros"}
    with pytest.raises(pyquant.FormatError, match="missing"):
        QuantizedWeight(qw.format, bad, qw.shape)
    with pytest.raises(pyquant.ShapeError, match="shape"):
        QuantizedWeight(qw.format, t, (4, 65))
    codes = torch.full((2, 8), 16)
    with pytest.raises(pyquant.FormatError, match=r"\[0, 15\]"):
        pyquant.pack(codes, Int(4, 32))
