"""NF4: byte-for-byte agreement with bitsandbytes, packing, conversion, bad input.

bitsandbytes (CPU) is the peer that defines the format: our quantizer must
produce its packed bytes, absmax and nested statistics exactly, and our
reference dequantization its fp32 values.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyquant
from pyquant import NF4
from pyquant.errors import DtypeError, FormatError, ShapeError, ValueRangeError
from pyquant.formats import QuantizedWeight, format_from_spec
from pyquant.formats.nf4 import NF4_CODEBOOK
from pyquant.formats.nf4 import PAD_CODE, dynamic_map, nf4_pack_codes, nf4_unpack_codes

from tests.deps import installed, needs

# bitsandbytes defines the format: when it is installed it must import (a
# broken install fails here instead of turning every comparison into a skip).
if installed("bitsandbytes"):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
else:
    bnb = F = None
needs_bnb = needs("bitsandbytes")

BLOCK_SIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# Every block size on a ragged shape, the real layer shape at four; more
# shapes at a few.
CASES = (
    [((576, 1536), bs) for bs in (32, 64, 1024, 4096)]
    + [((37, 129), bs) for bs in BLOCK_SIZES]
    + [((1, 4096), bs) for bs in (64, 4096)]
    + [(shape, bs) for shape in [(3, 7), (1, 1), (300, 257), (64, 96), (5, 33), (16, 200)] for bs in (32, 64)]
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Row scales spread over decades so blocks differ and nested absmax is busy.
    w = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[0], 1, generator=g))
    return w.to(dtype)


def _bnb_quant(w, bs, dq):
    return F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq)


def _bnb_default_dequant(packed, absmax, bs, shape):
    """bitsandbytes' device-independent (default backend) dequantization."""
    from bitsandbytes.backends.default import ops as default_ops

    fn = getattr(default_ops._dequantize_4bit_compute, "__wrapped__", default_ops._dequantize_4bit_compute)
    return fn(packed.reshape(-1), absmax, F.get_4bit_type("nf4", device="cpu"), bs, shape, torch.float32)


def _bnb_cpu_kernel_runs_correctly(shape, bs):
    # bitsandbytes' CPU dequantize_4bit runs its C kernel only for even K and,
    # on AVX-512 CPUs, block sizes below 2048; otherwise it falls back to the
    # default backend (checked above) through torch.compile, which costs
    # seconds per shape. Its AVX-512 kernel (K % 16 == 0) indexes absmax per
    # row, row * (K // bs) + k // bs, which is wrong when blocks span rows
    # (K % bs != 0); its quantizer and default backend use flat blocks, as we
    # do, so those cases are checked against the default backend only.
    k = shape[1]
    return k % 2 == 0 and bs < 2048 and (k % bs == 0 or k % 16 != 0)


def _assert_same_as_bnb(w, bs, dq):
    shape = tuple(w.shape)
    packed, state = _bnb_quant(w, bs, dq)
    qw = pyquant.quantize_weight(w, NF4(bs, dq))
    t = qw.tensors
    assert torch.equal(t["qweight"], packed.reshape(-1)), "packed bytes differ"
    if dq:
        assert torch.equal(t["absmax_q"], state.absmax), "nested absmax codes differ"
        assert torch.equal(t["absmax_scale"], state.state2.absmax), "nested absmax scales differ"
        assert torch.equal(t["absmax_offset"], state.offset.reshape(1)), "absmax offset differs"
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        assert torch.equal(t["absmax"], state.absmax), "absmax differs"
        absmax = state.absmax
    ours = pyquant.dequantize(qw, torch.float32, kernel="reference")
    assert torch.equal(ours, _bnb_default_dequant(packed, absmax, bs, shape)), "dequantized values differ"
    if _bnb_cpu_kernel_runs_correctly(shape, bs):
        theirs = F.dequantize_4bit(packed, state)  # in the weight's dtype
        assert theirs.dtype == w.dtype
        ours_native = pyquant.dequantize(qw, w.dtype, kernel="reference")
        assert torch.equal(ours_native, theirs), "differs from bnb CPU dequantize"
    return qw, packed, state


@needs_bnb
@pytest.mark.parametrize("shape,bs", CASES, ids=[f"{s[0]}x{s[1]}-b{bs}" for s, bs in CASES])
def test_bytes_match_bitsandbytes(shape, bs):
    _assert_same_as_bnb(_weight(shape, seed=bs), bs, dq=False)


@needs_bnb
@pytest.mark.parametrize("bs", [32, 64, 4096])
@pytest.mark.parametrize("shape", [(576, 1536), (37, 129), (1, 1), (700, 77), (3, 8)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_double_quant_matches_bitsandbytes(shape, bs):
    _assert_same_as_bnb(_weight(shape, seed=7 * bs), bs, dq=True)


@needs_bnb
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dq", [False, True])
def test_half_precision_weights_match_bitsandbytes(dtype, dq):
    # bitsandbytes quantizes fp16/bf16 weights through their exact fp32 values;
    # so do we, so the bytes match for every input dtype.
    for shape, bs in [((96, 160), 32), ((33, 65), 32), ((8, 1000), 1024)]:
        _assert_same_as_bnb(_weight(shape, dtype, seed=shape[1]), bs, dq)


@needs_bnb
def test_values_on_codebook_midpoints_round_like_bitsandbytes():
    # Scaled values exactly on a midpoint take the lower code; probe each
    # midpoint and its fp32 neighbours, in full blocks (scaled by a reciprocal)
    # and in a ragged tail (scaled by a division).
    cb = torch.tensor(NF4_CODEBOOK)
    mids = (cb[:-1] + cb[1:]) / 2
    probes = torch.cat([mids, torch.nextafter(mids, torch.ones(15)), torch.nextafter(mids, -torch.ones(15))])
    for amax in (1.0, 0.3, 7.123):
        vals = []
        for p in probes:
            vals += [amax, float(p) * amax]
        w = torch.tensor(vals + [amax, 0.25 * amax, -0.4 * amax], dtype=torch.float32).reshape(1, -1)
        for bs in (32, 64):
            _assert_same_as_bnb(w, bs, dq=False)


@needs_bnb
def test_zero_and_constant_weights():
    # All-zero blocks (absmax 0, or the clamped 1e-38 in a ragged tail) and
    # constant weights (every absmax equal: the nested blocks are all zero).
    _assert_same_as_bnb(torch.zeros(4, 50), 32, dq=False)
    _assert_same_as_bnb(torch.zeros(4, 50), 32, dq=True)
    _assert_same_as_bnb(torch.full((64, 64), 0.5), 32, dq=True)
    w = _weight((16, 70))
    w[:, :40] = 0
    _assert_same_as_bnb(w, 32, dq=True)


@needs_bnb
def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map(), F.create_dynamic_map(signed=True))


# ---------------------------------------------------------------- packing ---


def test_pack_layout_first_value_high_nibble_and_pad():
    codes = torch.tensor([[1, 2, 3], [4, 5, 15]], dtype=torch.uint8)
    assert nf4_pack_codes(codes).tolist() == [0x12, 0x34, 0x5F]
    assert nf4_pack_codes(torch.tensor([9, 10, 11])).tolist() == [0x9A, (11 << 4) | PAD_CODE]
    assert nf4_unpack_codes(torch.tensor([0x9A, 0xB7], dtype=torch.uint8), 3).tolist() == [9, 10, 11]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    k=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = nf4_pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == ((n * k + 1) // 2,)
    flat = codes.reshape(-1)
    assert torch.equal(packed[: (n * k) // 2] >> 4, flat[0 : 2 * ((n * k) // 2) : 2])
    assert torch.equal(nf4_unpack_codes(packed, n * k).view(n, k), codes)
    fmt = NF4(32)
    assert torch.equal(pyquant.pack(codes, fmt), packed)
    qw = QuantizedWeight(fmt, {"qweight": packed, "absmax": torch.ones(fmt.num_blocks((n, k)))}, (n, k))
    assert torch.equal(pyquant.unpack(qw), codes)


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueRangeError, match="16"):
        nf4_pack_codes(torch.tensor([[0, 16]]))
    with pytest.raises(ValueRangeError, match="-1"):
        nf4_pack_codes(torch.tensor([[-1, 3]]))
    with pytest.raises(DtypeError):
        nf4_pack_codes(torch.tensor([[0.5, 3.0]]))


def test_unpack_of_quantized_weight_gives_nearest_codes():
    w = _weight((12, 40))
    qw = pyquant.quantize_weight(w, NF4(32))
    codes = pyquant.unpack(qw)
    assert codes.shape == (12, 40) and codes.dtype == torch.uint8
    deq = pyquant.dequantize(qw)
    absmax = qw.tensors["absmax"].repeat_interleave(32)[: 12 * 40].view(12, 40)
    assert torch.equal(deq, torch.tensor(NF4_CODEBOOK)[codes.long()] * absmax)


# -------------------------------------------------------------- bnb io ---


@needs_bnb
@pytest.mark.parametrize("dq", [False, True])
def test_from_bnb_to_bnb_round_trip(dq):
    from pyquant.io.bnb import from_bnb, to_bnb

    w = _weight((40, 72), seed=3)
    packed, state = _bnb_quant(w, 64, dq)
    qw = from_bnb(packed, state)
    ours = pyquant.quantize_weight(w, NF4(64, dq))
    assert qw.format == ours.format and qw.shape == (40, 72)
    for name, t in ours.tensors.items():
        assert torch.equal(qw.tensors[name], t), name
    p2, s2 = to_bnb(qw)
    assert torch.equal(p2, packed)
    assert s2.blocksize == 64 and s2.quant_type == "nf4" and s2.nested == dq and tuple(s2.shape) == (40, 72)
    assert torch.equal(F.dequantize_4bit(p2, s2), F.dequantize_4bit(packed, state))
    back = from_bnb(p2, s2)
    for name, t in qw.tensors.items():
        assert torch.equal(back.tensors[name], t), name
    # Serialised forms: QuantState.as_dict, packed (safetensors-ready) or not.
    for d in (state.as_dict(packed=True), state.as_dict(packed=False)):
        q2 = from_bnb(packed, d)
        for name, t in ours.tensors.items():
            assert torch.equal(q2.tensors[name], t), name


@needs_bnb
def test_from_bnb_params4bit_state_dict():
    from pyquant.io.bnb import from_bnb

    w = _weight((64, 128), seed=5)
    lin = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                   compress_statistics=True)
    lin = lin.to("cpu")
    ours = pyquant.quantize_weight(w, NF4(64, True))
    sd = lin.state_dict()
    from_sd = from_bnb(sd["weight"], {k: v for k, v in sd.items() if k.startswith("weight.")})
    from_param = from_bnb(lin.weight.data, lin.weight.quant_state)
    for qw in (from_sd, from_param):
        for name, t in ours.tensors.items():
            assert torch.equal(qw.tensors[name], t), name


@needs_bnb
def test_from_bnb_rejects_bad_input():
    from pyquant.io.bnb import from_bnb

    w = _weight((8, 64))
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="fp4")
    with pytest.raises(FormatError, match="fp4"):
        from_bnb(packed, state)
    packed, state = _bnb_quant(w, 64, False)
    with pytest.raises(ShapeError, match="255"):
        from_bnb(packed.reshape(-1)[:-1], state, shape=(8, 64))
    with pytest.raises(ShapeError):
        from_bnb(packed, state, shape=(4, 64))


# ------------------------------------------------------------ bad input ---


@pytest.mark.parametrize("bs", [48, 8192, 16, 0])
def test_bad_block_size_is_a_format_error_naming_it(bs):
    with pytest.raises(FormatError, match=str(bs)):
        NF4(block_size=bs)


def test_nan_and_inf_weights_are_rejected():
    w = _weight((4, 64))
    w[2, 5] = float("nan")
    with pytest.raises(ValueRangeError, match="NaN"):
        pyquant.quantize_weight(w, NF4())
    w[2, 5] = float("inf")
    with pytest.raises(ValueRangeError):
        pyquant.quantize_weight(w.half(), NF4(32, True))


def test_wrong_qweight_length_is_a_shape_error():
    fmt = NF4(64)
    with pytest.raises(ShapeError, match="qweight"):
        QuantizedWeight(fmt, {"qweight": torch.zeros(31, dtype=torch.uint8), "absmax": torch.ones(1)}, (8, 8))
    with pytest.raises(ShapeError, match="absmax"):
        QuantizedWeight(fmt, {"qweight": torch.zeros(32, dtype=torch.uint8), "absmax": torch.ones(2)}, (8, 8))


def test_spec_round_trip_and_sizes():
    for fmt in (NF4(), NF4(32, True), NF4(4096, False)):
        assert format_from_spec(fmt.spec()) == fmt
    fmt = NF4(64, True)
    specs = fmt.tensor_specs((300, 257))
    nb = math.ceil(300 * 257 / 64)
    assert specs["qweight"][0] == ((300 * 257 + 1) // 2,)
    assert specs["absmax_q"][0] == (nb,) and specs["absmax_scale"][0] == (math.ceil(nb / 256),)
