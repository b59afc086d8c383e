"""The mma layout of int4 weights (pyquant/formats/int_mma.py): lossless both
ways, the pure-torch pack/unpack against an index-by-index reading of the
documented layout, checkpoints, export to GPTQ/AWQ, and the op layer."""
import math

import pytest
import torch

import pyquant
from pyquant.formats import Int, IntMMA, QuantizedWeight, format_from_spec, from_mma, to_mma
from pyquant.formats.int_mma import NIBBLE_C, NIBBLE_E, NIBBLE_H, pack_mma_codes, padded_shape, unpack_mma_codes
from pyquant.io.awq import to_awq
from pyquant.io.gptq import to_gptq

SHAPES = [(16, 64), (20, 300), (33, 130), (1, 1), (48, 4096 + 8)]


def _weight(n, k, group=128, sym=False, sdtype=torch.float16, act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = pyquant.quantize_weight(torch.randn(n, k, generator=g), Int(4, group, sym, sdtype))
    if act_order:
        perm = torch.randperm(k, generator=g).to(torch.int32)
        t = dict(qw.tensors, perm=perm)
        qw = QuantizedWeight(Int(4, group, sym, sdtype, True), t, qw.shape)
    return qw


def _code_at(packed: torch.Tensor, n: int, k: int) -> int:
    """Code (n, k) read from the layout as the module docstring states it."""
    tile, r = divmod(n, 16)
    h, g = divmod(r, 8)
    kb, kk = divmod(k, 64)
    j, rem = divmod(kk, 16)
    c, rem = divmod(rem, 8)
    t, e = divmod(rem, 2)
    lane = 4 * g + t
    nibble = [i for i in range(8) if (NIBBLE_H[i], NIBBLE_C[i], NIBBLE_E[i]) == (h, c, e)]
    assert len(nibble) == 1
    byte0 = kb * 512 + lane * 16 + j * 4
    word = int.from_bytes(bytes(packed[tile, byte0:byte0 + 4].tolist()), "little")
    return (word >> (4 * nibble[0])) & 0xF


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_matches_the_documented_layout_and_round_trips(shape):
    n, k = shape
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(n * k), dtype=torch.uint8)
    packed = pack_mma_codes(codes)
    np_, kp = padded_shape(n, k)
    assert packed.shape == (np_ // 16, kp * 8) and packed.dtype == torch.uint8
    g = torch.Generator().manual_seed(1)
    for _ in range(64):
        i, j = int(torch.randint(0, n, (1,), generator=g)), int(torch.randint(0, k, (1,), generator=g))
        assert _code_at(packed, i, j) == int(codes[i, j])
    assert torch.equal(unpack_mma_codes(packed, n, k), codes)


def test_padding_codes_are_zero():
    codes = torch.full((20, 70), 15, dtype=torch.uint8)
    full = unpack_mma_codes(pack_mma_codes(codes), 32, 128)  # read the padded block back as data
    assert int(full[20:].sum()) == 0 and int(full[:, 70:].sum()) == 0


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("sdtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_repack_is_lossless_both_ways(group, sym, sdtype):
    qw = _weight(37, 300, group, sym, sdtype)
    mma = to_mma(qw)
    assert isinstance(mma.format, IntMMA) and mma.format.spec().startswith("int4mma_")
    back = from_mma(mma)
    assert back.format == qw.format
    for name, t in qw.tensors.items():
        assert torch.equal(back.tensors[name], t), name
    torch.testing.assert_close(mma.dequantize(), qw.dequantize(), rtol=0, atol=0)


def test_scales_are_group_major_with_row_pairs():
    qw = _weight(20, 256, 64)
    s = qw.tensors["scales"]
    ms = to_mma(qw).tensors["scales"]
    assert ms.shape == (4, 32)
    for col in range(20):
        block, pos = divmod(col, 16)
        stored = block * 16 + (2 * pos if pos < 8 else 2 * (pos - 8) + 1)
        assert torch.equal(ms[:, stored], s[col])
    padding = [16 + 2 * i + h for i in range(8) for h in (0, 1) if 16 + i + 8 * h >= 20]
    assert float(ms[:, padding].abs().sum()) == 0.0


def test_act_order_survives_and_pack_targets_the_layout():
    qw = _weight(24, 256, 64, act_order=True)
    mma = to_mma(qw)
    assert mma.format.act_order and torch.equal(mma.tensors["perm"], qw.tensors["perm"])
    torch.testing.assert_close(mma.dequantize(), qw.dequantize(), rtol=0, atol=0)
    codes, scales, zeros = qw.format.unpack(qw)
    fmt = IntMMA(4, 64, False, torch.float16, True)
    direct = fmt.pack(codes, scales, zeros, qw.tensors["perm"])
    via = to_mma(qw)
    assert direct.format == via.format and torch.equal(direct.format.unpack(direct)[0], codes)
    for name in via.tensors:
        assert torch.equal(direct.tensors[name], via.tensors[name]), name


def test_state_dict_round_trip():
    mma = to_mma(_weight(33, 130, 32, sym=True, sdtype=torch.bfloat16))
    state = mma.state_dict("layer.")
    back = QuantizedWeight.from_state_dict(state, "layer.")
    assert back.format == mma.format and format_from_spec(mma.format.spec()) == mma.format
    for name, t in mma.tensors.items():
        assert torch.equal(back.tensors[name], t)


@pytest.mark.parametrize("spec", ["int4mma_g128_asym_fp16", "int4mma_pc_sym_bf16_actorder", "int4mma_g32_sym_fp32"])
def test_spec_strings(spec):
    fmt = format_from_spec(spec)
    assert isinstance(fmt, IntMMA) and fmt.spec() == spec
    assert format_from_spec(fmt.plain().spec()) == fmt.plain()


def test_bad_formats_are_named():
    with pytest.raises(pyquant.FormatError, match="4-bit"):
        IntMMA(8, 128)
    with pytest.raises(pyquant.FormatError, match="int8_g128"):
        to_mma(pyquant.quantize_weight(torch.randn(8, 64), Int(8, 128)))
    with pytest.raises(pyquant.ShapeError, match=r"\(20, 300\)"):
        unpack_mma_codes(torch.zeros(1, 8, dtype=torch.uint8), 20, 300)


def test_export_to_gptq_and_awq_from_the_layout():
    qw = _weight(64, 256, 128)
    mma = to_mma(qw)
    for a, b in ((to_gptq(qw), to_gptq(mma)), (to_awq(qw), to_awq(mma))):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_op_layer_reference_kernels_take_the_layout():
    qw = _weight(40, 300, 64)
    mma = to_mma(qw)
    x = torch.randn(3, 300)
    torch.testing.assert_close(pyquant.qmatmul(x, mma), pyquant.qmatmul(x, qw, kernel="reference"), rtol=1e-6,
                               atol=1e-5)
    torch.testing.assert_close(pyquant.dequantize(mma), pyquant.dequantize(qw), rtol=0, atol=0)
    assert math.isclose(mma.bits_per_weight, qw.bits_per_weight, rel_tol=0.2)
