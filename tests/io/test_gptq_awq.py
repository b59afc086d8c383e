"""GPTQ and AWQ checkpoint layouts <-> Int format, checked against the
textbook dequantization formulas of those projects (written out here
independently of pyquant's bit-stream helper)."""
import pytest
import torch

import pyquant
from pyquant.formats import Int
from pyquant.io.awq import from_awq, to_awq
from pyquant.io.gptq import from_gptq, to_gptq
from pyquant.io.int32_bitstream import pack_int32, unpack_int32


def _u32(t):
    return t.to(torch.int64) & 0xFFFFFFFF


def gptq_textbook_dequant(qweight, qzeros, scales, g_idx, bits, version):
    """GPTQ's dequantization: shift each int32 by bits*j (3 bits: 96-bit stream)."""
    kw, n = qweight.shape
    k = kw * 32 // bits
    # Concatenate the words of each column into one Python integer bit stream.
    q = torch.zeros(k, n, dtype=torch.int64)
    qw = _u32(qweight)
    for col in range(n):
        stream = 0
        for r in reversed(range(kw)):
            stream = (stream << 32) | int(qw[r, col])
        for j in range(k):
            q[j, col] = (stream >> (bits * j)) & ((1 << bits) - 1)
    ng = scales.shape[0]
    z = torch.zeros(ng, n, dtype=torch.int64)
    qz = _u32(qzeros)
    for g in range(ng):
        stream = 0
        for c in reversed(range(qz.shape[1])):
            stream = (stream << 32) | int(qz[g, c])
        for j in range(n):
            z[g, j] = (stream >> (bits * j)) & ((1 << bits) - 1)
    if version == 1:
        z = z + 1
    gi = g_idx.long()
    return ((q - z[gi]).float() * scales[gi].float()).T  # (N, K)


def _random_gptq(bits, k, n, group, seed, act_order=False, version=1):
    g = torch.Generator().manual_seed(seed)
    ng = -(-k // group)
    q = torch.randint(0, 2**bits, (k, n), generator=g)
    lo = 1 if version == 1 else 0
    z = torch.randint(lo, 2**bits, (ng, n), generator=g)
    scales = (torch.rand(ng, n, generator=g) + 0.1).half()
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    stored_z = z - 1 if version == 1 else z
    return pack_int32(q, bits, 0), pack_int32(stored_z, bits, 1), scales, g_idx.to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_roundtrip_and_values(bits, version, act_order):
    k, n, group = 96 if bits != 3 else 96, 32, 32
    qweight, qzeros, scales, g_idx = _random_gptq(bits, k, n, group, seed=bits * 10 + version, act_order=act_order, version=version)
    qw = from_gptq(qweight, qzeros, scales, g_idx, bits, group, version=version)
    assert qw.format.act_order == act_order
    expected = gptq_textbook_dequant(qweight, qzeros, scales, g_idx, bits, version)
    assert torch.equal(qw.dequantize(), expected)
    back = to_gptq(qw, version=version)
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
        assert torch.equal(back[name], t), name


def test_gptq_symmetric_detection():
    k, n, bits = 64, 32, 4
    q = torch.randint(0, 16, (k, n))
    z = torch.full((2, n), 8)
    scales = torch.rand(2, n).half() + 0.1
    qw = from_gptq(pack_int32(q, 4, 0), pack_int32(z, 4, 1), scales, None, bits, 32, version=2)
    assert qw.format.symmetric
    assert torch.equal(to_gptq(qw, version=2)["qzeros"], pack_int32(z, 4, 1))


def test_gptq_bad_input():
    qweight, qzeros, scales, g_idx = _random_gptq(4, 64, 32, 32, seed=0)
    with pytest.raises(pyquant.FormatError, match="version"):
        from_gptq(qweight, qzeros, scales, g_idx, 4, 32, version=3)
    with pytest.raises(pyquant.DtypeError, match="qweight"):
        from_gptq(qweight.float(), qzeros, scales, g_idx, 4, 32)
    with pytest.raises(pyquant.ShapeError, match="g_idx"):
        from_gptq(qweight, qzeros, scales, g_idx[:-1], 4, 32)
    with pytest.raises(pyquant.FormatError, match="g_idx values"):
        from_gptq(qweight, qzeros, scales, g_idx + 5, 4, 32)
    uneven = g_idx.clone()
    uneven[:40] = 0
    uneven[40:] = 1
    with pytest.raises(pyquant.FormatError, match="columns each"):
        from_gptq(qweight, qzeros, scales, uneven, 4, 32)
    hqq_like = pyquant.quantize_weight(torch.randn(32, 64), Int(4, 32))
    hqq_like.tensors["zeros"] += 0.5
    with pytest.raises(pyquant.FormatError, match="float zeros"):
        to_gptq(hqq_like)


def awq_textbook_dequant(qweight, qzeros, scales, group):
    """AutoAWQ's unpacking: nibble shifts 0..28, then reverse order [0,4,1,5,2,6,3,7]."""
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]
    shifts = torch.arange(0, 32, 4)

    def unpack(t):
        v = (_u32(t)[:, :, None] >> shifts) & 15  # (rows, cols, 8) in packed order
        v = v[:, :, reverse]
        return v.reshape(t.shape[0], -1)

    q, z = unpack(qweight), unpack(qzeros)
    k = q.shape[0]
    gi = torch.arange(k) // group
    return ((q - z[gi]).float() * scales[gi].float()).T


def test_awq_roundtrip_and_values():
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    qw = pyquant.quantize_weight(w, Int(4, 128, False))
    t = to_awq(qw)
    assert t["qweight"].shape == (256, 6) and t["qzeros"].shape == (2, 6)
    assert torch.equal(awq_textbook_dequant(t["qweight"], t["qzeros"], t["scales"], 128), qw.dequantize())
    back = from_awq(t["qweight"], t["qzeros"], t["scales"], 128)
    assert torch.equal(back.dequantize(), qw.dequantize())
    for name, v in to_awq(back).items():
        assert torch.equal(v, t[name])


def test_awq_bad_input():
    qw = pyquant.quantize_weight(torch.randn(12, 64), Int(4, 32, False))
    with pytest.raises(pyquant.ShapeError, match="out_features=12"):
        to_awq(qw)
    with pytest.raises(pyquant.FormatError, match="4-bit"):
        to_awq(pyquant.quantize_weight(torch.randn(16, 64), Int(8, 32, False)))
    t = to_awq(pyquant.quantize_weight(torch.randn(16, 64), Int(4, 32, False)))
    with pytest.raises(pyquant.ShapeError, match="disagree"):
        from_awq(t["qweight"], t["qzeros"][:, :1], t["scales"], 32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bitstream_roundtrip(bits):
    v = torch.randint(0, 2**bits, (5, 64))
    assert torch.equal(unpack_int32(pack_int32(v, bits, 1), bits, 1, 64), v)
